//! The U-Boot environment and grubenv boot controls against the bootloaders' own tools, on
//! files: what we write, `fw_printenv` (libubootenv-tool) and `grub-editenv` read back the same,
//! and what `fw_setenv`, `mkenvimage` (u-boot-tools) and `grub-editenv` write, we read the same.
//! A missing tool fails the test with the fix (`platform_checks::tool`).
//!
//! The "power-on" steps: for U-Boot the tests play the bootloader with `fw_printenv` /
//! `fw_setenv`, following U-Boot's boot-count logic and the documented `altbootcmd` (no U-Boot
//! runs on the host); for GRUB, GRUB itself (`grub-emu`) runs the grub.cfg snippet of
//! docs/boot-control.md. Each also checks that our model of that logic (`power_on`) reaches the
//! same state.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use policy::{
    decode_env, encode_env, encode_grubenv, kernel_cmdline_value, BootControl, BootControlError,
    CrcByteOrder, EnvFormatError, EnvLocation, EnvVars, GrubAbScheme, GrubEnvBootControl,
    UBootAbScheme, UBootEnvBootControl, UBootEnvLayout, GRUBENV_SIZE,
};

const ENV_SIZE: usize = 0x2000;
const CMDLINE_PARAM: &str = "checkpointd.slot";

/// Runs a tool; Ok(stdout) on exit status 0, else Err with status and stderr.
fn run(tool: &str, args: &[&str]) -> Result<String, String> {
    let out = platform_checks::run(Command::new(platform_checks::tool(tool)).args(args));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{tool} {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn map_of(lines: &str) -> BTreeMap<String, String> {
    lines
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn map_of_vars(vars: &EnvVars) -> BTreeMap<String, String> {
    vars.iter()
        .map(|(k, v)| {
            (String::from_utf8_lossy(k).into_owned(), String::from_utf8_lossy(v).into_owned())
        })
        .collect()
}

fn vars_of(pairs: &[(&str, &str)]) -> EnvVars {
    pairs.iter().copied().collect()
}

/// A U-Boot environment on files in a temporary folder, with its fw_env.config.
struct UBootFixture {
    dir: tempfile::TempDir,
    config: PathBuf,
    layout: UBootEnvLayout,
}

/// Where the copies go.
#[derive(Clone, Copy, Debug)]
enum Copies {
    /// One env at offset 0x4000 of `env.img` (the offset must be honoured).
    Single,
    /// Two copies in one file, at 0x4000 and 0x8000.
    RedundantOneFile,
    /// Two copies in two files, each at offset 0.
    RedundantTwoFiles,
}

impl UBootFixture {
    /// Makes the env files (zeroed, so that no copy is valid yet) and the tools' config.
    fn new(copies: Copies) -> UBootFixture {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("env.img");
        let loc = |path: &Path, offset| EnvLocation { path: path.to_path_buf(), offset };
        let (primary, redundant) = match copies {
            Copies::Single => (loc(&first, 0x4000), None),
            Copies::RedundantOneFile => (loc(&first, 0x4000), Some(loc(&first, 0x8000))),
            Copies::RedundantTwoFiles => {
                (loc(&first, 0), Some(loc(&dir.path().join("env-redund.img"), 0)))
            }
        };
        let mut config = String::new();
        for l in std::iter::once(&primary).chain(redundant.as_ref()) {
            let len = usize::try_from(l.offset).unwrap() + ENV_SIZE;
            let mut bytes = fs::read(&l.path).unwrap_or_default();
            bytes.resize(bytes.len().max(len + 0x1000), 0);
            fs::write(&l.path, bytes).unwrap();
            config.push_str(&format!("{} {:#x} {ENV_SIZE:#x}\n", l.path.display(), l.offset));
        }
        let config_path = dir.path().join("fw_env.config");
        fs::write(&config_path, config).unwrap();
        let layout = UBootEnvLayout {
            primary,
            redundant,
            size: ENV_SIZE,
            crc_byte_order: CrcByteOrder::Little,
        };
        UBootFixture { dir, config: config_path, layout }
    }

    fn cfg(&self) -> &str {
        self.config.to_str().unwrap()
    }

    fn printenv(&self) -> Result<BTreeMap<String, String>, String> {
        run("fw_printenv", &["-c", self.cfg()]).map(|out| map_of(&out))
    }

    /// Sets variables in one write, as one `saveenv` does (`fw_setenv -s`).
    fn setenv(&self, pairs: &[(&str, &str)]) {
        let script = self.dir.path().join("script");
        let text: String = pairs.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        fs::write(&script, text).unwrap();
        run("fw_setenv", &["-c", self.cfg(), "-s", script.to_str().unwrap()]).unwrap();
    }

    /// Writes the first environment with `mkenvimage` into every copy (`-r` for a redundant
    /// one: flags 1 in both copies, so copy 0 is current, as after U-Boot's first save).
    fn mkenvimage(&self, pairs: &[(&str, &str)]) {
        let input = self.dir.path().join("env.txt");
        let text: String = pairs.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        fs::write(&input, text).unwrap();
        let image = self.dir.path().join("image.bin");
        let size = format!("{ENV_SIZE:#x}");
        let mut args = vec!["-s", size.as_str(), "-o", image.to_str().unwrap()];
        if self.layout.redundant.is_some() {
            args.insert(0, "-r");
        }
        args.push(input.to_str().unwrap());
        run("mkenvimage", &args).unwrap();
        let image = fs::read(image).unwrap();
        assert_eq!(image.len(), ENV_SIZE);
        for copy in self.locations() {
            self.write_at(&copy, &image);
        }
    }

    fn locations(&self) -> Vec<EnvLocation> {
        std::iter::once(self.layout.primary.clone()).chain(self.layout.redundant.clone()).collect()
    }

    fn read_at(&self, loc: &EnvLocation) -> Vec<u8> {
        let bytes = fs::read(&loc.path).unwrap();
        let start = usize::try_from(loc.offset).unwrap();
        bytes[start..start + ENV_SIZE].to_vec()
    }

    fn write_at(&self, loc: &EnvLocation, image: &[u8]) {
        let mut bytes = fs::read(&loc.path).unwrap();
        let start = usize::try_from(loc.offset).unwrap();
        bytes[start..start + image.len()].copy_from_slice(image);
        fs::write(&loc.path, bytes).unwrap();
    }

    /// Both copies' bytes (one for a single env).
    fn snapshot(&self) -> Vec<Vec<u8>> {
        self.locations().iter().map(|l| self.read_at(l)).collect()
    }

    fn cmdline(&self, slot_value: &str) -> PathBuf {
        let path = self.dir.path().join("cmdline");
        fs::write(
            &path,
            format!("console=ttyS0 root=/dev/mmcblk0p2 {CMDLINE_PARAM}={slot_value} quiet\n"),
        )
        .unwrap();
        path
    }

    /// Our boot control as the daemon builds it after a boot from `slot_value`.
    fn control(&self, slot_value: &str) -> Result<UBootEnvBootControl, BootControlError> {
        let booted = kernel_cmdline_value(&self.cmdline(slot_value), CMDLINE_PARAM)?;
        UBootEnvBootControl::open(
            self.layout.clone(),
            Some(self.dir.path().join("fw_printenv.lock")),
            UBootAbScheme::default(),
            &booted,
        )
    }

    /// What we read, as a plain map.
    fn ours(&self) -> BTreeMap<String, String> {
        map_of_vars(&self.layout.load().unwrap().vars)
    }

    /// Ok when `fw_printenv` shows exactly `expected`.
    fn tool_shows(&self, expected: &BTreeMap<String, String>) -> Result<(), String> {
        let tool = self.printenv()?;
        if &tool == expected {
            Ok(())
        } else {
            Err(format!("fw_printenv shows {tool:?}, expected {expected:?}"))
        }
    }

    /// Power-on with the boot-count feature and the documented altbootcmd, done with the
    /// tools; returns the slot value booted. Checks that our model agrees.
    fn power_on(&self) -> String {
        let scheme = UBootAbScheme::default();
        let before = self.printenv().unwrap();
        let mut model: EnvVars = before.iter().collect();
        let model_slot = scheme.power_on(&mut model, Path::new("model")).unwrap();
        let number = |name: &str| before.get(name).map_or(0, |v| v.parse::<u32>().unwrap());
        let slot = before["boot_slot"].clone();
        let booted = if number("upgrade_available") == 0 {
            slot
        } else {
            let count = number("bootcount") + 1;
            if number("bootlimit") > 0 && count > number("bootlimit") {
                let other = if slot == "a" { "b" } else { "a" };
                self.setenv(&[
                    ("boot_slot", other),
                    ("upgrade_available", "0"),
                    ("bootcount", "0"),
                ]);
                other.to_string()
            } else {
                self.setenv(&[("bootcount", &count.to_string())]);
                slot
            }
        };
        assert_eq!(booted, scheme.slot_values[usize::try_from(model_slot).unwrap()]);
        assert_eq!(self.printenv().unwrap(), map_of_vars(&model), "model and tools disagree");
        booted
    }
}

/// The integrator's default environment (docs/boot-control.md).
fn default_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("altbootcmd", "if test \"${boot_slot}\" = a; then setenv boot_slot b; else setenv boot_slot a; fi; setenv upgrade_available 0; setenv bootcount 0; saveenv; run bootcmd"),
        ("bootcmd", "run boot_ab"),
        ("bootcount", "0"),
        ("bootlimit", "3"),
        ("boot_slot", "a"),
        ("upgrade_available", "0"),
    ]
}

fn expect(pairs: &[(&str, &str)], changes: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut map: BTreeMap<String, String> =
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    for (k, v) in changes {
        map.insert(k.to_string(), v.to_string());
    }
    map
}

#[test]
fn uboot_single_env_ours_and_the_tools_read_each_others_writes() {
    let fx = UBootFixture::new(Copies::Single);
    fx.mkenvimage(&default_env());
    // mkenvimage's image (0xff padding) reads the same with us and the tool.
    assert_eq!(fx.ours(), expect(&default_env(), &[]));
    fx.tool_shows(&expect(&default_env(), &[])).unwrap();

    let bc = fx.control("a").unwrap();
    assert_eq!(bc.current_slot().unwrap(), 0);
    assert!(bc.is_slot_marked_successful(0).unwrap());
    bc.set_active_boot_slot(1).unwrap();
    let after = expect(
        &default_env(),
        &[("boot_slot", "b"), ("upgrade_available", "1"), ("bootcount", "0"), ("bootlimit", "3")],
    );
    fx.tool_shows(&after).unwrap();
    assert_eq!(fx.ours(), after);

    // The tool writes, we read.
    fx.setenv(&[("bootcount", "2"), ("extra", "hello world")]);
    let state = bc.state().unwrap();
    assert_eq!((state.active, state.upgrade_available, state.bootcount), (1, true, 2));
    assert_eq!(state.tries_left(), 1);
    assert_eq!(fx.ours(), fx.printenv().unwrap());
    assert!(!bc.is_slot_marked_successful(1).unwrap());
    assert!(bc.is_slot_marked_successful(0).unwrap(), "the fallback of a trial is the good slot");
}

#[test]
fn uboot_env_image_from_our_encoder_reads_with_the_tool_and_vice_versa() {
    let fx = UBootFixture::new(Copies::Single);
    let vars = vars_of(&[("b", "2"), ("a", "1"), ("with space", "x y"), ("empty", "")]);
    let image = encode_env(&vars, ENV_SIZE, None, CrcByteOrder::Little).unwrap();
    fx.write_at(&fx.layout.primary, &image);
    fx.tool_shows(&map_of_vars(&vars)).unwrap();
    // And mkenvimage's image decodes to what it was given.
    fx.mkenvimage(&[("x", "1"), ("y", "two words")]);
    let decoded = decode_env(&fx.read_at(&fx.layout.primary), false, CrcByteOrder::Little).unwrap();
    assert_eq!(decoded.vars, vars_of(&[("x", "1"), ("y", "two words")]));
    assert_eq!(decoded.flags, None);
}

#[test]
fn uboot_our_images_equal_mkenvimage_with_zero_padding() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("env.txt");
    // mkenvimage keeps its input's order; U-Boot and libubootenv save sorted: sorted input.
    let mut env = default_env();
    env.sort();
    fs::write(&input, env.iter().map(|(k, v)| format!("{k}={v}\n")).collect::<String>()).unwrap();
    let vars = vars_of(&env);
    for (args, flags, order) in [
        (vec![], None, CrcByteOrder::Little),
        (vec!["-r"], Some(1), CrcByteOrder::Little),
        (vec!["-b"], None, CrcByteOrder::Big),
    ] {
        let out = dir.path().join("image.bin");
        let size = format!("{ENV_SIZE:#x}");
        let mut all = args.clone();
        all.extend(["-p", "0", "-s", &size, "-o", out.to_str().unwrap(), input.to_str().unwrap()]);
        run("mkenvimage", &all).unwrap();
        assert_eq!(
            fs::read(&out).unwrap(),
            encode_env(&vars, ENV_SIZE, flags, order).unwrap(),
            "mkenvimage {args:?}"
        );
    }
}

/// Which copy changed between two snapshots; panics unless exactly one did.
fn changed_copy(before: &[Vec<u8>], after: &[Vec<u8>]) -> usize {
    let changed: Vec<usize> = (0..before.len()).filter(|i| before[*i] != after[*i]).collect();
    assert_eq!(changed.len(), 1, "exactly one copy is written per save");
    changed[0]
}

fn flags_of(fx: &UBootFixture, copy: usize) -> u8 {
    fx.snapshot()[copy][4]
}

fn redundant_writes_alternate_and_agree(copies: Copies) {
    let fx = UBootFixture::new(copies);
    fx.mkenvimage(&default_env());
    assert_eq!((flags_of(&fx, 0), flags_of(&fx, 1)), (1, 1), "mkenvimage -r writes flags 1");
    let bc = fx.control("a").unwrap();
    let mut expected = expect(&default_env(), &[]);
    for round in 0..4 {
        // Ours: goes to the older copy with the next flags value; the current copy is intact.
        let before = fx.snapshot();
        let current = fx.layout.load().unwrap().copy;
        let slot = round % 2;
        bc.set_active_boot_slot(1 - slot).unwrap();
        let after = fx.snapshot();
        let written = changed_copy(&before, &after);
        assert_eq!(written, 1 - current, "round {round}: ours wrote the current copy");
        assert_eq!(after[written][4], before[current][4].wrapping_add(1));
        expected.insert("boot_slot".into(), if slot == 0 { "b" } else { "a" }.into());
        expected.insert("upgrade_available".into(), "1".into());
        fx.tool_shows(&expected).unwrap();

        // The tool's: also to the older copy; we read it.
        let before = fx.snapshot();
        fx.setenv(&[("round", &round.to_string())]);
        let after = fx.snapshot();
        assert_eq!(changed_copy(&before, &after), current, "fw_setenv wrote the other copy");
        expected.insert("round".into(), round.to_string());
        assert_eq!(fx.ours(), expected);
    }
}

#[test]
fn uboot_redundant_env_in_one_file_alternates_copies_like_fw_setenv() {
    redundant_writes_alternate_and_agree(Copies::RedundantOneFile);
}

#[test]
fn uboot_redundant_env_in_two_files_alternates_copies_like_fw_setenv() {
    redundant_writes_alternate_and_agree(Copies::RedundantTwoFiles);
}

#[test]
fn uboot_redundant_flags_counter_wraps_as_the_tool_expects() {
    // Either copy may hold 255 when the counter wraps.
    for current in [0usize, 1] {
        let fx = UBootFixture::new(Copies::RedundantOneFile);
        let old = vars_of(&[("boot_slot", "a"), ("v", "old")]);
        let new = vars_of(&[("boot_slot", "a"), ("v", "new")]);
        let locations = fx.locations();
        let image = |vars, flags| encode_env(vars, ENV_SIZE, Some(flags), CrcByteOrder::Little);
        fx.write_at(&locations[current], &image(&new, 255).unwrap());
        fx.write_at(&locations[1 - current], &image(&old, 254).unwrap());
        fx.tool_shows(&map_of_vars(&new)).unwrap();
        let loaded = fx.layout.load().unwrap();
        assert_eq!((loaded.copy, loaded.flags), (current, Some(255)));
        // Our next write lands in the other copy with flags 0, which must now be the newer.
        let bc = fx.control("a").unwrap();
        bc.set_active_boot_slot(1).unwrap();
        assert_eq!(flags_of(&fx, 1 - current), 0);
        let expected = expect(
            &[("boot_slot", "b"), ("v", "new")],
            &[("upgrade_available", "1"), ("bootcount", "0"), ("bootlimit", "3")],
        );
        fx.tool_shows(&expected).unwrap();
        assert_eq!(fx.layout.load().unwrap().copy, 1 - current);
        // And the tool's next write (back in the first copy, flags 1) is read by us.
        fx.setenv(&[("v", "tool")]);
        assert_eq!(flags_of(&fx, current), 1);
        assert_eq!(fx.ours().get("v").map(String::as_str), Some("tool"));
    }
}

#[test]
fn uboot_redundant_env_with_a_corrupt_copy_falls_back_to_the_other_like_the_tool() {
    let fx = UBootFixture::new(Copies::RedundantOneFile);
    fx.mkenvimage(&default_env());
    let bc = fx.control("a").unwrap();
    bc.set_active_boot_slot(1).unwrap(); // copy 1 now current (flags 2)
    assert_eq!(fx.layout.load().unwrap().copy, 1);
    // Corrupt one data byte of the current copy: both we and the tool take copy 0 (older).
    let second = fx.layout.redundant.clone().unwrap();
    let mut image = fx.read_at(&second);
    image[100] ^= 0x55;
    fx.write_at(&second, &image);
    let loaded = fx.layout.load().unwrap();
    assert_eq!(loaded.copy, 0);
    assert!(matches!(loaded.other_copy_error, Some(EnvFormatError::BadCrc { .. })));
    fx.tool_shows(&expect(&default_env(), &[])).unwrap();
    assert_eq!(fx.ours(), expect(&default_env(), &[]));
    // The next write replaces the corrupt copy, not the good one.
    let before = fx.snapshot();
    bc.mark_boot_successful().unwrap(); // booted a, active a, no trial: nothing to write
    assert_eq!(fx.snapshot(), before, "nothing to change, nothing written");
    bc.set_active_boot_slot(1).unwrap();
    assert_eq!(changed_copy(&before, &fx.snapshot()), 1);
    fx.tool_shows(&expect(&default_env(), &[("boot_slot", "b"), ("upgrade_available", "1")]))
        .unwrap();
}

#[test]
fn uboot_single_env_with_a_bad_crc_is_refused_and_never_written() {
    let fx = UBootFixture::new(Copies::Single);
    fx.mkenvimage(&default_env());
    let bc = fx.control("a").unwrap();
    let mut image = fx.read_at(&fx.layout.primary);
    image[200] ^= 1;
    fx.write_at(&fx.layout.primary, &image);
    let before = fs::read(&fx.layout.primary.path).unwrap();

    let err = bc.set_active_boot_slot(1).unwrap_err();
    assert!(
        matches!(
            &err,
            BootControlError::Env { source: EnvFormatError::BadCrc { .. }, offset: 0x4000, .. }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("CRC mismatch"), "{err}");
    assert_eq!(err.kind(), policy::ErrorKind::Corrupt);
    assert!(bc.mark_boot_successful().is_err());
    assert!(bc.is_slot_marked_successful(0).is_err());
    assert!(matches!(fx.control("a"), Err(BootControlError::Env { .. })));
    assert_eq!(fs::read(&fx.layout.primary.path).unwrap(), before, "nothing was written");
    // The tool refuses it too.
    assert!(fx.printenv().is_err(), "fw_printenv read a corrupt env");
}

#[test]
fn uboot_redundant_env_with_both_copies_bad_is_refused() {
    let fx = UBootFixture::new(Copies::RedundantTwoFiles);
    // Zeroed copies: CRC 0 is not the CRC of zeros.
    let err = fx.control("a").unwrap_err();
    assert!(
        matches!(&err, BootControlError::Env { source: EnvFormatError::NoValidCopy { .. }, .. }),
        "{err:?}"
    );
    assert!(fx.printenv().is_err());
}

fn ab_cycle(copies: Copies) {
    let fx = UBootFixture::new(copies);
    fx.mkenvimage(&default_env());

    // Boot 1: slot a, no trial.
    assert_eq!(fx.power_on(), "a");
    let bc = fx.control("a").unwrap();
    assert!(bc.is_slot_marked_successful(0).unwrap());
    // An update installs to b and makes it active.
    bc.set_active_boot_slot(1).unwrap();
    assert!(!bc.is_slot_marked_successful(1).unwrap());

    // Boot 2 and 3: b on trial, counted, not committed.
    assert_eq!(fx.power_on(), "b");
    assert_eq!(fx.printenv().unwrap()["bootcount"], "1");
    assert_eq!(fx.power_on(), "b");
    let bc = fx.control("b").unwrap();
    assert_eq!(bc.current_slot().unwrap(), 1);
    assert_eq!(bc.state().unwrap().tries_left(), 1);
    assert!(!bc.is_slot_marked_successful(1).unwrap());
    assert!(bc.is_slot_marked_successful(0).unwrap());
    // Commit: the trial ends.
    bc.mark_boot_successful().unwrap();
    let env = fx.printenv().unwrap();
    assert_eq!((env["upgrade_available"].as_str(), env["bootcount"].as_str()), ("0", "0"));
    assert!(bc.is_slot_marked_successful(1).unwrap());
    // Boot 4: b again, no counting.
    assert_eq!(fx.power_on(), "b");
    assert_eq!(fx.printenv().unwrap()["bootcount"], "0");

    // Next update to a, which never comes up: three counted boots, then altbootcmd.
    let bc = fx.control("b").unwrap();
    bc.set_active_boot_slot(0).unwrap();
    for count in 1..=3 {
        assert_eq!(fx.power_on(), "a");
        assert_eq!(fx.printenv().unwrap()["bootcount"], count.to_string());
    }
    assert_eq!(fx.power_on(), "b", "bootcount > bootlimit: altbootcmd falls back");
    let bc = fx.control("b").unwrap();
    assert!(bc.is_slot_marked_successful(1).unwrap());
    assert!(!bc.is_slot_marked_successful(0).unwrap());
    let env = fx.printenv().unwrap();
    assert_eq!((env["boot_slot"].as_str(), env["upgrade_available"].as_str()), ("b", "0"));
    // The fallback boot commits: nothing to write.
    let before = fx.snapshot();
    bc.mark_boot_successful().unwrap();
    assert_eq!(fx.snapshot(), before);
}

#[test]
fn uboot_ab_cycle_single_env() {
    ab_cycle(Copies::Single);
}

#[test]
fn uboot_ab_cycle_redundant_env() {
    ab_cycle(Copies::RedundantTwoFiles);
}

#[test]
fn uboot_booted_slot_comes_from_the_kernel_command_line() {
    let fx = UBootFixture::new(Copies::Single);
    fx.mkenvimage(&default_env());
    assert!(matches!(fx.control("c"), Err(BootControlError::BootedSlotInvalid { .. })));
    fs::write(fx.dir.path().join("cmdline"), "console=ttyS0 quiet\n").unwrap();
    let err = kernel_cmdline_value(&fx.dir.path().join("cmdline"), CMDLINE_PARAM).unwrap_err();
    assert!(matches!(err, BootControlError::BootedSlotUnknown { .. }), "{err:?}");
    // An unknown slot value in the env is refused with the variable named.
    fx.setenv(&[("boot_slot", "z")]);
    let err = fx.control("a").unwrap_err();
    assert!(err.to_string().contains("boot_slot=\"z\""), "{err}");
}

/// The check the tests above rely on must fail when our encoding is wrong: an env written
/// with the CRC in the wrong byte order (what a big-endian target writes, or a byte-order
/// bug) is not what `fw_printenv` on this little-endian host reads.
#[test]
fn uboot_wrong_crc_byte_order_is_caught_by_the_tool_comparison() {
    let fx = UBootFixture::new(Copies::Single);
    let vars = vars_of(&[("boot_slot", "a"), ("upgrade_available", "0")]);
    let expected = map_of_vars(&vars);
    fx.write_at(&fx.layout.primary, &encode_env(&vars, ENV_SIZE, None, CrcByteOrder::Big).unwrap());
    let err = fx.tool_shows(&expected).unwrap_err();
    assert!(err.contains("fw_printenv"), "{err}");
    // The same variables with the right byte order pass the same check.
    fx.write_at(
        &fx.layout.primary,
        &encode_env(&vars, ENV_SIZE, None, CrcByteOrder::Little).unwrap(),
    );
    fx.tool_shows(&expected).unwrap();
}

/// Same for the redundant flags: a writer that forgot to advance the counter (new data in the
/// older copy with the current copy's flags) is read as the old environment by the tool.
#[test]
fn uboot_wrong_flags_handling_is_caught_by_the_tool_comparison() {
    let fx = UBootFixture::new(Copies::RedundantOneFile);
    fx.mkenvimage(&[("boot_slot", "a")]); // both copies flags 1, copy 0 current
    let new = vars_of(&[("boot_slot", "b"), ("upgrade_available", "1")]);
    let second = fx.layout.redundant.clone().unwrap();
    fx.write_at(&second, &encode_env(&new, ENV_SIZE, Some(1), CrcByteOrder::Little).unwrap());
    assert!(fx.tool_shows(&map_of_vars(&new)).is_err(), "the tool took a copy with stale flags");
    fx.write_at(&second, &encode_env(&new, ENV_SIZE, Some(2), CrcByteOrder::Little).unwrap());
    fx.tool_shows(&map_of_vars(&new)).unwrap();
}

// ---- GRUB ----

struct GrubFixture {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl GrubFixture {
    fn new() -> GrubFixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grubenv");
        let fx = GrubFixture { dir, path };
        fx.editenv(&["create"]).unwrap();
        fx
    }

    fn editenv(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec![self.path.to_str().unwrap()];
        all.extend_from_slice(args);
        run("grub-editenv", &all)
    }

    fn list(&self) -> Result<BTreeMap<String, String>, String> {
        self.editenv(&["list"]).map(|out| map_of(&out))
    }

    fn set(&self, pairs: &[(&str, &str)]) {
        let args: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut all = vec!["set"];
        all.extend(args.iter().map(String::as_str));
        self.editenv(&all).unwrap();
    }

    fn control(&self, slot_name: &str) -> Result<GrubEnvBootControl, BootControlError> {
        let cmdline = self.dir.path().join("cmdline");
        fs::write(&cmdline, format!("BOOT_IMAGE=/vmlinuz {CMDLINE_PARAM}={slot_name} ro\n"))
            .unwrap();
        let booted = kernel_cmdline_value(&cmdline, CMDLINE_PARAM)?;
        GrubEnvBootControl::open(&self.path, GrubAbScheme::default(), &booted)
    }

    fn ours(&self) -> BTreeMap<String, String> {
        let bc = GrubEnvBootControl::open(&self.path, GrubAbScheme::default(), "A").unwrap();
        map_of_vars(&bc.load().unwrap().0)
    }

    fn tool_shows(&self, expected: &BTreeMap<String, String>) -> Result<(), String> {
        let tool = self.list()?;
        if &tool == expected {
            Ok(())
        } else {
            Err(format!("grub-editenv list shows {tool:?}, expected {expected:?}"))
        }
    }

    /// Power-on: GRUB itself (`grub-emu`) runs the grub.cfg snippet documented in
    /// docs/boot-control.md on an ext2 image holding this block (so that `save_env` can write
    /// it), and the block it leaves becomes this one. Returns the slot GRUB chose; checks that
    /// our model chose the same and left the same variables.
    fn power_on(&self) -> String {
        let scheme = GrubAbScheme::default();
        let mut model: EnvVars = self.list().unwrap().iter().collect();
        let model_slot = scheme.power_on(&mut model, Path::new("model")).unwrap();

        let work = self.dir.path().join("grub-emu");
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(work.join("fs")).unwrap();
        fs::copy(&self.path, work.join("fs/grubenv")).unwrap();
        let disk = work.join("disk.img");
        let (fs_dir, disk_str) = (work.join("fs"), disk.to_str().unwrap());
        run("mke2fs", &["-q", "-t", "ext2", "-d", fs_dir.to_str().unwrap(), disk_str, "4M"])
            .unwrap();
        fs::write(work.join("device.map"), format!("(hd0) {disk_str}\n")).unwrap();
        let cfg = format!(
            "set checkpointd_grubenv=(hd0)/grubenv\n{}\necho \"checkpointd-booted=${{boot_slot}}.\"\nhalt\n",
            documented_grub_snippet()
        );
        fs::write(work.join("grub.cfg"), cfg).unwrap();
        let work_str = work.to_str().unwrap();
        let map = work.join("device.map");
        let out = run("grub-emu", &["-d", work_str, "-m", map.to_str().unwrap()]).unwrap();
        assert!(!out.contains("error"), "GRUB reported an error running the snippet: {out:?}");
        let booted = out
            .split_once("checkpointd-booted=")
            .and_then(|(_, rest)| rest.split_once('.'))
            .map(|(slot, _)| slot.to_string())
            .unwrap_or_else(|| panic!("GRUB printed no slot: {out:?}"));
        let block = platform_checks::run(Command::new(platform_checks::tool("debugfs")).args([
            "-R",
            "cat /grubenv",
            disk_str,
        ]));
        assert!(block.status.success(), "debugfs: {block:?}");
        fs::write(&self.path, &block.stdout).unwrap();

        assert_eq!(booted, scheme.slot_names[usize::try_from(model_slot).unwrap()]);
        assert_eq!(self.list().unwrap(), map_of_vars(&model), "model and GRUB disagree");
        booted
    }
}

/// The grub.cfg block after the `grub-ab-select` marker in docs/boot-control.md: the tests
/// run what integrators copy.
fn documented_grub_snippet() -> String {
    let doc = platform_checks::workspace_root().join("docs/boot-control.md");
    let text = fs::read_to_string(&doc).unwrap();
    let (_, after) = text.split_once("<!-- grub-ab-select").expect("marker in boot-control.md");
    let (_, block) = after.split_once("```\n").expect("code block after the marker");
    let (block, _) = block.split_once("\n```").expect("end of the code block");
    block.to_string()
}

#[test]
fn grubenv_ours_and_grub_editenv_read_each_others_writes() {
    let fx = GrubFixture::new();
    fx.set(&[("saved_entry", "gnulinux-advanced"), ("menu_auto_hide", "1")]);
    let bc = fx.control("A").unwrap();
    assert!(bc.is_slot_marked_successful(0).unwrap(), "unset A_GOOD defaults to 1");
    assert!(!bc.is_slot_marked_successful(1).unwrap());
    bc.set_active_boot_slot(1).unwrap();
    let expected = expect(
        &[("saved_entry", "gnulinux-advanced"), ("menu_auto_hide", "1")],
        &[("ORDER", "B A"), ("B_GOOD", "0"), ("B_LEFT", "3")],
    );
    fx.tool_shows(&expected).unwrap();
    assert_eq!(fs::metadata(&fx.path).unwrap().len(), 1024);
    assert!(fs::read_dir(fx.dir.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".tmp")));

    fx.set(&[("B_LEFT", "1"), ("A_GOOD", "1")]);
    let state = bc.state().unwrap();
    assert_eq!(state.order, vec![1, 0]);
    assert_eq!(state.slots[1].left, 1);
    assert_eq!(fx.ours(), fx.list().unwrap());
    fx.editenv(&["unset", "menu_auto_hide"]).unwrap();
    assert!(!fx.ours().contains_key("menu_auto_hide"));
}

#[test]
fn grubenv_escapes_match_grub_editenv() {
    let fx = GrubFixture::new();
    let awkward = "a\\b\\\\c";
    fx.set(&[("X", awkward), ("Y", "l1\nl2")]);
    let ours = fx.ours();
    assert_eq!(ours["X"], awkward);
    assert_eq!(ours["Y"], "l1\nl2");
    // Our encoding of the same is byte-identical to grub-editenv's apart from the header
    // comment grub-editenv create adds, so the tool lists the same text.
    let block = encode_grubenv(&vars_of(&[("X", awkward), ("Y", "l1\nl2")]), GRUBENV_SIZE).unwrap();
    let listed_before = fx.editenv(&["list"]).unwrap();
    fs::write(&fx.path, &block).unwrap();
    assert_eq!(fx.editenv(&["list"]).unwrap(), listed_before);
}

#[test]
fn grubenv_ab_cycle_with_fallback() {
    let fx = GrubFixture::new();
    assert_eq!(fx.power_on(), "A");
    fx.control("A").unwrap().set_active_boot_slot(1).unwrap();
    // B on trial: each boot spends a try.
    assert_eq!(fx.power_on(), "B");
    assert_eq!(fx.list().unwrap()["B_LEFT"], "2");
    assert_eq!(fx.power_on(), "B");
    let bc = fx.control("B").unwrap();
    assert!(!bc.is_slot_marked_successful(1).unwrap());
    bc.mark_boot_successful().unwrap();
    fx.tool_shows(&expect(&[("ORDER", "B A"), ("B_GOOD", "1"), ("B_LEFT", "0")], &[])).unwrap();
    assert_eq!(fx.power_on(), "B");
    assert_eq!(fx.list().unwrap()["B_LEFT"], "0", "a good slot spends no tries");

    // Update back to A, which never comes up: three tries, then B (still good).
    fx.control("B").unwrap().set_active_boot_slot(0).unwrap();
    for left in (0..3).rev() {
        assert_eq!(fx.power_on(), "A");
        assert_eq!(fx.list().unwrap()["A_LEFT"], left.to_string());
    }
    assert_eq!(fx.power_on(), "B", "A's tries are spent: B boots");
    let bc = fx.control("B").unwrap();
    assert!(bc.is_slot_marked_successful(1).unwrap());
    assert!(!bc.is_slot_marked_successful(0).unwrap());
    assert_eq!(bc.state().unwrap().next_boot_slot(), Some(1));
}

#[test]
fn grubenv_bad_block_is_refused_and_never_written() {
    let fx = GrubFixture::new();
    let mut block = fs::read(&fx.path).unwrap();
    block[2] = b'X'; // "# XRUB Environment Block"
    fs::write(&fx.path, &block).unwrap();
    let err = fx.control("A").unwrap_err();
    assert!(
        matches!(&err, BootControlError::Env { source: EnvFormatError::NoSignature { .. }, .. }),
        "{err:?}"
    );
    assert_eq!(fs::read(&fx.path).unwrap(), block);
    assert!(fx.list().is_err(), "grub-editenv accepted a block without its signature");

    // A value the scheme does not define is refused, naming the variable.
    let fx = GrubFixture::new();
    fx.set(&[("B_GOOD", "yes")]);
    let err = fx.control("A").unwrap_err();
    assert!(err.to_string().contains("B_GOOD=\"yes\""), "{err}");
    assert!(matches!(fx.control("C"), Err(BootControlError::BootedSlotInvalid { .. })));
}

/// The comparison fails on a wrong encoding: a writer that does not escape `\` (a bug GRUB's
/// reader turns into a different value).
#[test]
fn grubenv_missing_escape_is_caught_by_the_tool_comparison() {
    let fx = GrubFixture::new();
    let expected = expect(&[("X", "a\\b")], &[]);
    let mut unescaped = b"# GRUB Environment Block\nX=a\\b\n".to_vec();
    unescaped.resize(GRUBENV_SIZE, b'#');
    fs::write(&fx.path, &unescaped).unwrap();
    assert!(fx.tool_shows(&expected).is_err(), "grub-editenv read an unescaped backslash as-is");
    fs::write(&fx.path, encode_grubenv(&vars_of(&[("X", "a\\b")]), GRUBENV_SIZE).unwrap()).unwrap();
    fx.tool_shows(&expected).unwrap();
}

// ---- The checkpoint policy on top ----

/// A backend that protects nothing: the story below is about the boot control.
#[derive(Debug)]
struct NullBackend;

impl policy::Backend for NullBackend {
    fn kind(&self) -> policy::BackendKind {
        policy::BackendKind::Block
    }
    fn name(&self) -> &str {
        "null"
    }
    fn prepare(&self) -> Result<policy::Action, policy::BackendError> {
        Ok(policy::Action::Changed)
    }
    fn commit(&self) -> Result<policy::Action, policy::BackendError> {
        Ok(policy::Action::Changed)
    }
    fn space(&self) -> Result<policy::BackupSpace, policy::BackendError> {
        Ok(policy::BackupSpace::default())
    }
    fn status(&self) -> Result<policy::BackendStatus, policy::BackendError> {
        Ok(policy::BackendStatus {
            state: policy::BackendState::Idle,
            backup_used_bytes: None,
            free_bytes: None,
            devices: Vec::new(),
        })
    }
}

/// vold's semantics over the U-Boot env: an update to b is checkpointed implicitly (b is on
/// trial) and the commit ends the trial in the environment U-Boot reads.
#[test]
fn uboot_env_under_the_policy_update_is_checkpointed_and_the_commit_ends_the_trial() {
    let fx = UBootFixture::new(Copies::RedundantOneFile);
    fx.mkenvimage(&default_env());
    let state = fx.dir.path().join("state");
    let daemon = |slot: &str| {
        policy::Checkpointer::new(
            policy::Store::open(&state).unwrap(),
            Box::new(fx.control(slot).unwrap()),
            vec![Box::new(NullBackend)],
            policy::PolicyOptions::default(),
        )
        .unwrap()
    };

    assert_eq!(fx.power_on(), "a");
    let cp = daemon("a");
    assert!(!cp.needs_checkpoint().unwrap(), "a is good: no implicit checkpoint");
    cp.start_checkpoint(1).unwrap();
    fx.control("a").unwrap().set_active_boot_slot(1).unwrap(); // the updater
    drop(cp);

    assert_eq!(fx.power_on(), "b");
    let cp = daemon("b");
    assert!(cp.needs_checkpoint().unwrap());
    cp.prepare_checkpoint().unwrap();
    assert_eq!(fx.printenv().unwrap()["upgrade_available"], "1");
    cp.commit_changes().unwrap();
    let env = fx.printenv().unwrap();
    assert_eq!(
        (env["boot_slot"].as_str(), env["upgrade_available"].as_str(), env["bootcount"].as_str()),
        ("b", "0", "0"),
        "the commit marked b successful where U-Boot looks"
    );
    assert_eq!(fx.power_on(), "b");
}
