//! The accuracy benchmark's workloads (`workloads/*.sh`, format in docs/workloads.md) run as the
//! format says: `setup` then `update` on an empty file system at `$DATA`, exit 0, the update
//! changes the data, bad calls are refused, and a fill level is met. On a tmpfs (needs root, as
//! CI runs the tests), so no script can fill the host's disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u64) -> Tmpfs {
        let dir = tempfile::tempdir().expect("temp dir");
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={mib}m,mode=0755").as_str()),
        )
        .unwrap_or_else(|e| {
            panic!(
                "cannot mount a tmpfs on {}: {e}. The workload tests run the scripts on one and \
                 need root (CI runs the tests as root).",
                dir.path().display()
            )
        });
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

fn workloads() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../workloads");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "sh"))
        .collect();
    out.sort();
    out
}

/// Runs `sh script part` with `DATA` and `env`.
fn run(script: &Path, part: Option<&str>, data: Option<&Path>, env: &[(&str, &str)]) -> Output {
    for tool in ["sh", "awk", "perl", "sqlite3", "df"] {
        platform_checks::tool(tool);
    }
    let mut cmd = Command::new("sh");
    cmd.arg(script).args(part).env_remove("DATA").env_remove("SEED").env_remove("FILL");
    if let Some(d) = data {
        cmd.env("DATA", d);
    }
    cmd.envs(env.iter().copied());
    platform_checks::run(&mut cmd)
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every file under `root`: size and modification time.
fn tree(root: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir") {
            let e = e.expect("entry");
            let m = e.metadata().expect("metadata");
            if m.is_dir() {
                todo.push(e.path());
            } else {
                out.insert(e.path(), (m.len(), m.modified().expect("mtime")));
            }
        }
    }
    out
}

#[test]
fn every_workload_sets_up_and_updates_its_data() {
    let scripts = workloads();
    assert!(scripts.len() >= 5, "the repo's set: {scripts:?}");
    for script in &scripts {
        let fs = Tmpfs::mount(400);
        ok(&run(script, Some("setup"), Some(fs.path()), &[("SEED", "1000")]), "setup");
        let before = tree(fs.path());
        assert!(before.len() > 5, "{}: setup made {} files", script.display(), before.len());
        ok(&run(script, Some("update"), Some(fs.path()), &[("SEED", "1")]), "update");
        let after = tree(fs.path());
        let changed = after.iter().filter(|(p, v)| before.get(*p) != Some(v)).count()
            + before.keys().filter(|p| !after.contains_key(*p)).count();
        assert!(changed > 0, "{}: the update changed nothing", script.display());
    }
}

#[test]
fn bad_calls_are_refused() {
    let fs = Tmpfs::mount(16);
    for script in &workloads() {
        let no_part = run(script, None, Some(fs.path()), &[]);
        assert_eq!(no_part.status.code(), Some(2), "{}: no part", script.display());
        let other = run(script, Some("teardown"), Some(fs.path()), &[]);
        assert_eq!(other.status.code(), Some(2), "{}: unknown part", script.display());
        let no_data = run(script, Some("setup"), None, &[]);
        assert!(!no_data.status.success(), "{}: no DATA", script.display());
        assert!(String::from_utf8_lossy(&no_data.stderr).contains("DATA"));
    }
}

#[test]
fn the_fill_level_is_met() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../workloads/fill-levels.sh");
    let fs = Tmpfs::mount(128);
    ok(&run(&script, Some("setup"), Some(fs.path()), &[("SEED", "1000"), ("FILL", "80")]), "setup");
    let st = nix::sys::statvfs::statvfs(fs.path()).expect("statvfs");
    let used = 100.0 * (st.blocks() - st.blocks_free()) as f64 / st.blocks() as f64;
    assert!((78.0..=82.0).contains(&used), "FILL=80 gave {used:.1}% used");
}
