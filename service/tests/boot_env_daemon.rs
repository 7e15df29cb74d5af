//! The daemon builds the `uboot-env` and `grubenv` boot controls from its configuration: the
//! booted slot from the configured command line file, the environment from the configured
//! place, and a clear start error naming the file when either is wrong. (The controls against
//! the bootloaders' tools: policy/tests/boot_env_tools.rs.)

use std::fs;
use std::path::Path;

use checkpointd::config::Config;
use checkpointd::daemon::{build, StartError};
use policy::{encode_env, encode_grubenv, CrcByteOrder, EnvVars};

fn config(dir: &Path, boot_control: &str) -> Config {
    let text = format!(
        "metadata_dir = \"{}\"\n[[backend]]\ntype = \"test-null\"\n[boot_control]\n{boot_control}\n\
         cmdline_file = \"{}\"\n[binder]\nenabled = false\n[socket]\npath = \"{}\"\n",
        dir.join("metadata").display(),
        dir.join("cmdline").display(),
        dir.join("sock").display(),
    );
    let config = Config::parse(&text).expect("parses");
    config.validate().expect("valid");
    config
}

fn start_error(config: &Config) -> String {
    match build(config) {
        Ok(_) => panic!("the daemon started"),
        Err(e @ StartError::BootControl { .. }) => e.to_string(),
        Err(other) => panic!("unexpected error: {other}"),
    }
}

#[test]
fn uboot_env_boot_control_is_built_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let env: EnvVars =
        [("boot_slot", "b"), ("upgrade_available", "1"), ("bootlimit", "3")].into_iter().collect();
    let mut image = vec![0u8; 0x1000];
    image.extend(encode_env(&env, 0x2000, None, CrcByteOrder::Little).unwrap());
    image.resize(0x8000, 0);
    fs::write(dir.path().join("env.img"), &image).unwrap();
    let config = config(
        dir.path(),
        &format!(
            "type = \"uboot-env\"\nenv_path = \"{}\"\nenv_offset = 0x1000\nenv_size = 0x2000\n\
             env_lock_file = \"{}\"",
            dir.path().join("env.img").display(),
            dir.path().join("lock").display()
        ),
    );

    fs::write(dir.path().join("cmdline"), "root=/dev/mmcblk0p3 rw\n").unwrap();
    let err = start_error(&config);
    assert!(err.contains("cmdline") && err.contains("checkpointd.slot="), "{err}");

    fs::write(dir.path().join("cmdline"), "root=/dev/mmcblk0p3 checkpointd.slot=b rw\n").unwrap();
    let built = build(&config).unwrap_or_else(|e| panic!("{e}"));
    drop(built);

    // A wrong size reads as a bad CRC: refused, naming the environment.
    let mut wrong = config.clone();
    wrong.boot_control.env_size = Some(0x4000);
    let err = start_error(&wrong);
    assert!(err.contains("env.img") && err.contains("CRC"), "{err}");
    // An offset past the end names the missing bytes.
    wrong.boot_control.env_offset = 0x7000;
    let err = start_error(&wrong);
    assert!(err.contains("ends before byte 0xb000"), "{err}");
}

#[test]
fn grubenv_boot_control_is_built_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let grubenv = dir.path().join("grubenv");
    let config = config(
        dir.path(),
        &format!("type = \"grubenv\"\ngrubenv_path = \"{}\"", grubenv.display()),
    );
    fs::write(dir.path().join("cmdline"), "checkpointd.slot=A\n").unwrap();
    let err = start_error(&config);
    assert!(err.contains("grubenv"), "a missing grubenv is an error: {err}");

    fs::write(&grubenv, encode_grubenv(&EnvVars::new(), 1024).unwrap()).unwrap();
    build(&config).unwrap_or_else(|e| panic!("{e}"));
    fs::write(dir.path().join("cmdline"), "checkpointd.slot=C\n").unwrap();
    let err = start_error(&config);
    assert!(err.contains("\"C\""), "{err}");
}
