//! Mounting a [`MountPlan`], with vold's f2fs `checkpoint=disable` ladder
//! (vold-checkpoint.md §6.3) and its infinite loop fixed.
//!
//! The ladder, when the plan asks for it: `checkpoint=disable:<g>%` for g = 0, 10, … up to
//! the plan's maximum (f2fs answers `EAGAIN` when garbage collection cannot make enough space
//! usable at that allowance); `EINVAL` (a kernel without the `:<n>%` syntax) drops to the plain
//! `checkpoint=disable`; a second `EINVAL` drops to no checkpoint option at all, so the mount
//! proceeds **unprotected** (logged at `warn!`), as vold's does. vold retries the plain rung
//! for ever while it answers `EAGAIN`; here it is tried [`PLAIN_RUNG_ATTEMPTS`] times, and a
//! ladder that ends in `EAGAIN` fails with that errno so the boot flow can decide.

use std::path::Path;

use blockdev::mount::MountOptions;
use nix::errno::Errno;
use policy::BackendError;

use crate::MountPlan;

/// How many times the plain `checkpoint=disable` rung is tried while it answers `EAGAIN`.
pub const PLAIN_RUNG_ATTEMPTS: usize = 3;

/// One mount attempt of a ladder, for logs and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountAttempt {
    /// The filesystem options tried.
    pub options: String,
    /// The errno, `None` when the mount succeeded.
    pub errno: Option<Errno>,
}

/// Splits fstab-style options into generic mount flags and the filesystem's option string.
pub(crate) fn split_options(options: &str) -> MountOptions {
    let mut out = MountOptions::default();
    let mut data = Vec::new();
    for word in options.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        match word {
            "ro" => out.read_only = true,
            "rw" => out.read_only = false,
            "nosuid" => out.nosuid = true,
            "nodev" => out.nodev = true,
            "noexec" => out.noexec = true,
            "noatime" => out.noatime = true,
            "defaults" => {}
            other => data.push(other),
        }
    }
    out.data = data.join(",");
    out
}

fn join(base: &str, extra: &str) -> String {
    match (base.is_empty(), extra.is_empty()) {
        (_, true) => base.to_owned(),
        (true, false) => extra.to_owned(),
        (false, false) => format!("{base},{extra}"),
    }
}

/// The ladder's decisions, over any mount function (`try_mount(data)` mounts with filesystem
/// options `data`). Returns the options that mounted and every attempt made.
pub fn mount_with(
    plan: &MountPlan,
    try_mount: &mut dyn FnMut(&str) -> Result<(), Errno>,
) -> (Result<String, Errno>, Vec<MountAttempt>) {
    let base = split_options(&plan.options).data;
    let mut attempts = Vec::new();
    let mut attempt = |opts: String, attempts: &mut Vec<MountAttempt>| {
        let r = try_mount(&opts);
        attempts.push(MountAttempt { options: opts.clone(), errno: r.err() });
        r.map(|()| opts)
    };
    let Some(max) = plan.checkpoint_disable_max_percent else {
        let r = attempt(base, &mut attempts);
        return (r, attempts);
    };
    let max = max.min(100);
    // Rungs with an allowance.
    let mut percent = 0u8;
    let mut last = Errno::EAGAIN;
    loop {
        match attempt(join(&base, &format!("checkpoint=disable:{percent}%")), &mut attempts) {
            Ok(o) => return (Ok(o), attempts),
            Err(Errno::EAGAIN) if percent < max => percent = (percent + 10).min(max),
            Err(Errno::EAGAIN) => return (Err(Errno::EAGAIN), attempts),
            Err(Errno::EINVAL) => break,
            Err(e) => return (Err(e), attempts),
        }
    }
    // The plain option: bounded retries on EAGAIN (vold loops here for ever).
    for _ in 0..PLAIN_RUNG_ATTEMPTS {
        match attempt(join(&base, "checkpoint=disable"), &mut attempts) {
            Ok(o) => return (Ok(o), attempts),
            Err(Errno::EAGAIN) => last = Errno::EAGAIN,
            Err(Errno::EINVAL) => {
                last = Errno::EINVAL;
                break;
            }
            Err(e) => return (Err(e), attempts),
        }
    }
    if last == Errno::EAGAIN {
        return (Err(Errno::EAGAIN), attempts);
    }
    // No checkpoint option at all: the mount proceeds unprotected, as vold's does.
    let r = attempt(base, &mut attempts);
    (r, attempts)
}

/// Mounts `plan.device` on `mount_point`, running the `checkpoint=disable` ladder when the plan
/// asks for it. Returns the filesystem options the mount used: a caller that planned a
/// checkpoint can tell from them whether this boot is protected (`checkpoint=disable` present).
/// A plan without a filesystem type tries `ext4`, then `f2fs`.
pub fn mount(plan: &MountPlan, mount_point: &Path) -> Result<String, BackendError> {
    let flags = split_options(&plan.options);
    let types: Vec<&str> = match plan.fs_type.as_deref() {
        Some(t) => vec![t],
        None => vec!["ext4", "f2fs"],
    };
    let mut last_err = None;
    for fs_type in types {
        let mut try_mount = |data: &str| {
            let opts = MountOptions { data: data.to_owned(), ..flags.clone() };
            blockdev::mount::mount(&plan.device, mount_point, fs_type, &opts).map_err(|e| {
                let errno = e.errno;
                last_err = Some(e);
                errno
            })
        };
        let (result, attempts) = mount_with(plan, &mut try_mount);
        match result {
            Ok(used) => {
                if plan.checkpoint_disable_max_percent.is_some() && !used.contains("checkpoint=") {
                    log::warn!(
                        "{} mounted on {} WITHOUT checkpoint=disable (the kernel refused the \
                         option): this boot's changes cannot be rolled back",
                        plan.device.display(),
                        mount_point.display()
                    );
                } else if attempts.len() > 1 {
                    log::info!(
                        "{} mounted on {} with {used:?} after {} attempts",
                        plan.device.display(),
                        mount_point.display(),
                        attempts.len()
                    );
                }
                return Ok(used);
            }
            Err(errno) if plan.fs_type.is_none() && errno == Errno::EINVAL => continue,
            Err(_) => break,
        }
    }
    Err(match last_err {
        Some(e) => crate::errors::mount(e),
        None => BackendError::Unsupported {
            backend: "mount".into(),
            reason: format!("no filesystem type mounts {}", plan.device.display()),
        },
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::Action;

    fn plan(options: &str, ladder: Option<u8>) -> MountPlan {
        MountPlan {
            device: PathBuf::from("/dev/dm-0"),
            fs_type: Some("f2fs".into()),
            options: options.into(),
            checkpointed: ladder.is_some(),
            action: Action::Changed,
            checkpoint_disable_max_percent: ladder,
            note: None,
        }
    }

    /// A kernel that answers each option string from a script (default: success).
    fn kernel<'a>(answers: &'a [(&'a str, Errno)]) -> impl FnMut(&str) -> Result<(), Errno> + 'a {
        move |data: &str| match answers.iter().find(|(o, _)| *o == data) {
            Some((_, e)) => Err(*e),
            None => Ok(()),
        }
    }

    fn tried(attempts: &[MountAttempt]) -> Vec<&str> {
        attempts.iter().map(|a| a.options.as_str()).collect()
    }

    #[test]
    fn flags_are_split_from_filesystem_options() {
        let o = split_options("noatime,nosuid,discard,,errors=panic,defaults");
        assert!(o.noatime && o.nosuid && !o.read_only);
        assert_eq!(o.data, "discard,errors=panic");
    }

    #[test]
    fn without_a_ladder_the_options_are_used_once() {
        let (r, a) = mount_with(&plan("noatime,discard", None), &mut kernel(&[]));
        assert_eq!(r, Ok("discard".to_owned()));
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn eagain_climbs_in_steps_of_ten() {
        let answers = [
            ("discard,checkpoint=disable:0%", Errno::EAGAIN),
            ("discard,checkpoint=disable:10%", Errno::EAGAIN),
        ];
        let (r, a) = mount_with(&plan("discard", Some(100)), &mut kernel(&answers));
        assert_eq!(r, Ok("discard,checkpoint=disable:20%".to_owned()));
        assert_eq!(a.len(), 3);
    }

    #[test]
    fn einval_falls_to_plain_then_to_none() {
        let answers =
            [("checkpoint=disable:0%", Errno::EINVAL), ("checkpoint=disable", Errno::EINVAL)];
        let (r, a) = mount_with(&plan("", Some(100)), &mut kernel(&answers));
        assert_eq!(r, Ok(String::new()), "unprotected mount, as vold");
        assert_eq!(tried(&a), ["checkpoint=disable:0%", "checkpoint=disable", ""]);
    }

    #[test]
    fn plain_rung_eagain_is_bounded_not_an_infinite_loop() {
        let answers =
            [("checkpoint=disable:0%", Errno::EINVAL), ("checkpoint=disable", Errno::EAGAIN)];
        let (r, a) = mount_with(&plan("", Some(100)), &mut kernel(&answers));
        assert_eq!(r, Err(Errno::EAGAIN));
        assert_eq!(a.len(), 1 + PLAIN_RUNG_ATTEMPTS);
    }

    #[test]
    fn the_ladder_stops_at_its_maximum() {
        let mut calls = 0;
        let mut always_eagain = |_: &str| {
            calls += 1;
            Err(Errno::EAGAIN)
        };
        let (r, a) = mount_with(&plan("", Some(25)), &mut always_eagain);
        assert_eq!(r, Err(Errno::EAGAIN));
        assert_eq!(
            tried(&a),
            [
                "checkpoint=disable:0%",
                "checkpoint=disable:10%",
                "checkpoint=disable:20%",
                "checkpoint=disable:25%"
            ]
        );
        assert_eq!(calls, 4);
    }

    #[test]
    fn other_errors_end_the_ladder_at_once() {
        let answers = [("checkpoint=disable:0%", Errno::EIO)];
        let (r, a) = mount_with(&plan("", Some(100)), &mut kernel(&answers));
        assert_eq!(r, Err(Errno::EIO));
        assert_eq!(a.len(), 1);
    }
}
