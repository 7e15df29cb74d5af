//! The Soong files (Android.bp): Soong's own `bpfmt` parses and formats them, and our checks
//! (platform/src/soong.rs) find every file and module they name, their agreement with the Cargo
//! manifests, the VINTF fragment and the Cargo variables Soong does not set. Each check is also
//! run on a broken copy of the tree, to show it fails.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use platform_checks::soong;

/// A copy of the tree's sources (no `target/`, no hidden folders) in a fresh temporary folder.
fn copy_of_tree() -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap().flatten() {
            let name = entry.file_name();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                let skip = name.to_string_lossy().starts_with('.') || name == "target";
                if !skip {
                    copy(&entry.path(), &to.join(&name));
                }
            } else if kind.is_file() {
                fs::copy(entry.path(), to.join(&name)).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy(&platform_checks::workspace_root(), dir.path());
    dir
}

/// Replaces `old` (which must be there) by `new` in the file at `root/path`.
fn edit(root: &Path, path: &str, old: &str, new: &str) {
    let path = root.join(path);
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains(old), "{} has no {old:?}", path.display());
    fs::write(&path, text.replacen(old, new, 1)).unwrap();
}

/// Asserts some problem contains every one of `parts`.
fn assert_reported(problems: &[String], parts: &[&str]) {
    assert!(
        problems.iter().any(|p| parts.iter().all(|part| p.contains(part))),
        "no problem mentions {parts:?}; problems: {problems:#?}"
    );
}

fn files_of(root: &Path) -> Vec<PathBuf> {
    soong::find_android_bp(root)
}

/// The newest frozen version of android.system.checkpoint (the tests below break whichever
/// version is current, so a new freeze needs no change here).
fn newest_frozen_version(root: &Path) -> u32 {
    fs::read_dir(root.join("aidl/aidl_api/android.system.checkpoint"))
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .max()
        .expect("a frozen version")
}

#[test]
fn every_android_bp_is_bpfmt_clean() {
    let root = platform_checks::workspace_root();
    let files = files_of(&root);
    // The top level and one per crate folder (blockcopy, bow, snapcow, blockdev, backends,
    // policy, aidl, bootctl, service, cli, client, fuzz).
    assert!(files.len() >= 13, "found only {files:?}");
    let problems = soong::bpfmt_problems(&root, &files);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_tree_passes_the_soong_checks() {
    let root = platform_checks::workspace_root();
    let problems = soong::all_problems(&root);
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The modules the integration guide names are there, with what they install.
    let files = soong::load(&root).unwrap();
    let module = |name: &str| {
        files.iter().flat_map(|f| &f.modules).find(|m| m.name() == Some(name)).cloned()
    };
    let daemon = module("checkpointd").expect("the checkpointd binary");
    assert_eq!(daemon.kind, "rust_binary");
    let strings = |key: &str| daemon.get(key).and_then(|v| v.as_strings()).unwrap_or_default();
    assert_eq!(strings("init_rc"), ["init/checkpointd.rc"]);
    assert_eq!(strings("vintf_fragments"), ["android/vintf/checkpointd.xml"]);
    let aidl = module("android.system.checkpoint").expect("the aidl_interface");
    assert_eq!(aidl.get("stability").and_then(|v| v.as_str()), Some("vintf"));
    assert_eq!(module("checkpointctl").map(|m| m.kind), Some("rust_binary".into()));
}

#[test]
fn bpfmt_reports_a_parse_error() {
    let tree = copy_of_tree();
    edit(tree.path(), "bow/Android.bp", "rust_library {", "rust_library {\n    name: ,");
    let problems = soong::bpfmt_problems(tree.path(), &files_of(tree.path()));
    assert_reported(&problems, &["bow/Android.bp", "bpfmt cannot parse it"]);
    // Our reader refuses it too (the other checks need the modules).
    assert_reported(&soong::all_problems(tree.path()), &["bow/Android.bp:", "expected a value"]);
}

#[test]
fn bpfmt_reports_a_formatting_difference() {
    let tree = copy_of_tree();
    edit(
        tree.path(),
        "policy/Android.bp",
        "    crate_root: \"src/lib.rs\",",
        "  crate_root:\"src/lib.rs\",",
    );
    let problems = soong::bpfmt_problems(tree.path(), &files_of(tree.path()));
    assert_reported(&problems, &["policy/Android.bp", "not bpfmt-formatted", "crate_root"]);
    assert_eq!(problems.len(), 1, "{problems:#?}");
}

#[test]
fn select_is_refused_by_bpfmt_and_by_our_reader() {
    let tree = copy_of_tree();
    edit(
        tree.path(),
        "snapcow/Android.bp",
        "    host_supported: true,",
        "    host_supported: select(soong_config_variable(\"a\", \"b\"), {\n        default: true,\n    }),",
    );
    let problems = soong::bpfmt_problems(tree.path(), &files_of(tree.path()));
    assert_reported(&problems, &["snapcow/Android.bp", "bpfmt cannot parse it"]);
    assert_reported(&soong::all_problems(tree.path()), &["snapcow/Android.bp:", "select"]);
}

#[test]
fn a_missing_file_is_reported() {
    let tree = copy_of_tree();
    fs::remove_file(tree.path().join("android/vintf/checkpointd.xml")).unwrap();
    fs::remove_file(tree.path().join("fuzz/fuzz_targets/validate_log.rs")).unwrap();
    let problems = soong::all_problems(tree.path());
    assert_reported(
        &problems,
        &["Android.bp:", "checkpointd", "`android/vintf/checkpointd.xml` does not exist"],
    );
    assert_reported(
        &problems,
        &["fuzz/Android.bp", "fuzz_targets/validate_log.rs` does not exist"],
    );
}

#[test]
fn a_glob_matching_nothing_and_a_path_outside_the_folder_are_reported() {
    let tree = copy_of_tree();
    edit(
        tree.path(),
        "aidl/Android.bp",
        "\"android/system/checkpoint/*.aidl\"",
        "\"android/system/checkpoint/*.aidI\"",
    );
    edit(
        tree.path(),
        "cli/Android.bp",
        "crate_root: \"src/main.rs\",\n}",
        "crate_root: \"../cli/src/main.rs\",\n}",
    );
    let problems = soong::all_problems(tree.path());
    assert_reported(
        &problems,
        &["aidl/Android.bp", "android.system.checkpoint", "matches no file"],
    );
    assert_reported(&problems, &["cli/Android.bp", "checkpointctl", "outside the module folder"]);
}

#[test]
fn a_frozen_aidl_version_without_its_hash_is_reported() {
    let tree = copy_of_tree();
    let version = newest_frozen_version(tree.path());
    fs::remove_file(
        tree.path().join(format!("aidl/aidl_api/android.system.checkpoint/{version}/.hash")),
    )
    .unwrap();
    let problems = soong::all_problems(tree.path());
    assert_reported(&problems, &["aidl/Android.bp", ".hash is missing or empty"]);
    // The genrule names the .hash as an input too.
    assert_reported(&problems, &["checkpoint_aidl_rs", ".hash` does not exist"]);
}

#[test]
fn an_unknown_module_is_reported() {
    let tree = copy_of_tree();
    edit(tree.path(), "snapcow/Android.bp", "\"libblockcopy\"", "\"libblockcopy_typo\"");
    edit(
        tree.path(),
        "aidl/Android.bp",
        "tools: [\"checkpoint_aidl_rs_gen\"]",
        "tools: [\"aidl_gen_typo\"]",
    );
    let problems = soong::all_problems(tree.path());
    assert_reported(
        &problems,
        &["snapcow/Android.bp", "rustlibs names `libblockcopy_typo`", "does not list"],
    );
    assert_reported(&problems, &["aidl/Android.bp", "tools names `aidl_gen_typo`"]);
}

#[test]
fn an_external_module_listed_without_its_origin_or_unused_is_reported() {
    let tree = copy_of_tree();
    let list = tree.path().join(soong::EXTERNAL_MODULES);
    let text = fs::read_to_string(&list).unwrap();
    fs::write(&list, format!("{text}\n[vendored.libunused]\ncrate = \"serde\"\npath = \"x\"\n"))
        .unwrap();
    assert_reported(
        &soong::all_problems(tree.path()),
        &["`libunused` is listed but no module uses it"],
    );

    fs::write(&list, format!("{text}\n[vendored.libnowhere]\ncrate = \"nowhere\"\n")).unwrap();
    assert_reported(&soong::all_problems(tree.path()), &["[vendored] libnowhere needs `path`"]);

    fs::write(
        &list,
        text.replace(
            "libcrc32fast = \"external/rust/android-crates-io/crates/crc32fast\"",
            "libcrc32fast = \"\"",
        ),
    )
    .unwrap();
    assert_reported(
        &soong::all_problems(tree.path()),
        &["[aosp] libcrc32fast needs a non-empty string"],
    );
}

#[test]
fn a_vendored_crate_the_build_does_not_use_is_reported() {
    let tree = copy_of_tree();
    edit(
        tree.path(),
        soong::EXTERNAL_MODULES,
        "crate = \"indicatif\"",
        "crate = \"indicatif-typo\"",
    );
    assert_reported(
        &soong::all_problems(tree.path()),
        &["`libindicatif` vendors crate `indicatif-typo`, which Cargo.lock does not have"],
    );
}

#[test]
fn a_dependency_missing_against_cargo_is_reported() {
    let tree = copy_of_tree();
    edit(tree.path(), "bow/Android.bp", "        \"libcrc32fast\",\n", "");
    let problems = soong::all_problems(tree.path());
    assert_reported(
        &problems,
        &["bow/Android.bp", "libbow", "lacks `libcrc32fast`", "bow/Cargo.toml"],
    );
}

#[test]
fn a_cargo_dependency_missing_from_soong_is_reported() {
    let tree = copy_of_tree();
    // A new Cargo dependency (AOSP spelling exception: log is liblog_rust).
    edit(
        tree.path(),
        "snapcow/Cargo.toml",
        "[dependencies]\n",
        "[dependencies]\nlog.workspace = true\n",
    );
    let problems = soong::all_problems(tree.path());
    assert_reported(&problems, &["snapcow/Android.bp", "libsnapcow", "lacks `liblog_rust`"]);
    assert_reported(&problems, &["snapcow/Android.bp", "snapcow_test", "lacks `liblog_rust`"]);
}

#[test]
fn a_soong_dependency_cargo_does_not_have_is_reported() {
    let tree = copy_of_tree();
    edit(
        tree.path(),
        "policy/Android.bp",
        "        \"librusqlite\",\n",
        "        \"librusqlite\",\n        \"libserde_json\",\n",
    );
    let problems = soong::all_problems(tree.path());
    assert_reported(
        &problems,
        &["policy/Android.bp", "libpolicy", "has `libserde_json`", "[dependencies]"],
    );
}

#[test]
fn a_build_tool_must_match_the_build_dependencies() {
    let tree = copy_of_tree();
    edit(
        tree.path(),
        "aidl/Android.bp",
        "rustlibs: [\"librsbinder_aidl\"]",
        "rustlibs: [\"librsbinder\"]",
    );
    let problems = soong::all_problems(tree.path());
    assert_reported(
        &problems,
        &["checkpoint_aidl_rs_gen", "lacks `librsbinder_aidl`", "[build-dependencies]"],
    );
    assert_reported(&problems, &["checkpoint_aidl_rs_gen", "has `librsbinder`"]);
}

#[test]
fn a_dev_dependency_the_unit_tests_use_must_be_in_the_rust_test() {
    let tree = copy_of_tree();
    edit(tree.path(), "snapcow/Android.bp", "    rustlibs: [\"libproptest\"],\n", "");
    let problems = soong::all_problems(tree.path());
    assert_reported(&problems, &["snapcow_test", "use `proptest`", "lacks `libproptest`"]);
}

#[test]
fn a_workspace_member_without_modules_must_be_declared_host_only() {
    let tree = copy_of_tree();
    edit(tree.path(), soong::EXTERNAL_MODULES, "\nxtask = ", "\n# xtask = ");
    assert_reported(
        &soong::all_problems(tree.path()),
        &["workspace member `xtask` has no Soong module"],
    );

    let tree = copy_of_tree();
    edit(tree.path(), soong::EXTERNAL_MODULES, "\ntests = ", "\nsnapcow = \"wrongly\"\ntests = ");
    assert_reported(
        &soong::all_problems(tree.path()),
        &["workspace member `snapcow` has Soong modules but is listed under [host_only]"],
    );
}

#[test]
fn a_vintf_fragment_that_disagrees_with_the_interface_is_reported() {
    let tree = copy_of_tree();
    let version = newest_frozen_version(tree.path());
    let unfrozen = version + 1;
    edit(
        tree.path(),
        "android/vintf/checkpointd.xml",
        &format!("<version>{version}</version>"),
        &format!("<version>{unfrozen}</version>"),
    );
    edit(tree.path(), "android/vintf/checkpointd.xml", "ICheckpoint/default", "ICheckpoint/other");
    let problems = soong::all_problems(tree.path());
    assert_reported(
        &problems,
        &["checkpointd.xml", &format!("version {unfrozen} is not the newest frozen version")],
    );
    assert_reported(
        &problems,
        &[
            "checkpointd.xml",
            "no Rust source serves \"android.system.checkpoint.ICheckpoint/other\"",
        ],
    );

    let tree = copy_of_tree();
    edit(tree.path(), "android/vintf/checkpointd.xml", "type=\"framework\"", "type=\"device\"");
    assert_reported(
        &soong::all_problems(tree.path()),
        &["checkpointd.xml", "needs <manifest type=\"framework\">"],
    );
}

#[test]
fn a_cargo_variable_soong_does_not_set_is_reported() {
    // bow's unit tests read CARGO_MANIFEST_DIR: a rust_test for them would not compile.
    let tree = copy_of_tree();
    let bp = tree.path().join("bow/Android.bp");
    let text = fs::read_to_string(&bp).unwrap();
    fs::write(
        &bp,
        format!(
            "{text}\nrust_test {{\n    name: \"bow_test\",\n    crate_name: \"bow\",\n    crate_root: \"src/lib.rs\",\n    rustlibs: [\"libblockcopy\", \"libcrc32fast\", \"libserde\", \"libthiserror\", \"libproptest\", \"libserde_json\", \"libtempfile\"],\n}}\n"
        ),
    )
    .unwrap();
    let problems = soong::all_problems(tree.path());
    assert_reported(&problems, &["bow_test", "bow/src/restore/tests.rs reads CARGO_MANIFEST_DIR"]);
    // The library does not compile the test files: only the test is reported.
    assert!(
        !problems.iter().any(|p| p.contains("libbow") && p.contains("CARGO_")),
        "{problems:#?}"
    );
}

/// Cargo's build-script executable and OUT_DIR for each package folder, from `cargo build
/// --message-format=json` of `packages` (a no-op when they are built). `--keep-going`: the
/// build scripts are all this needs, and a library that does not compile is another test's
/// failure.
fn cargo_build_scripts(packages: &[&str]) -> BTreeMap<PathBuf, (PathBuf, PathBuf)> {
    let root = platform_checks::workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(["build", "--keep-going", "--message-format=json"]).current_dir(&root);
    for package in packages {
        command.arg("-p").arg(package);
    }
    let output = platform_checks::run(&mut command);
    let mut executables = BTreeMap::new();
    let mut out_dirs = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let id = message["package_id"].as_str().unwrap_or_default().to_owned();
        match message["reason"].as_str() {
            Some("compiler-artifact") if message["target"]["kind"][0] == "custom-build" => {
                let manifest = PathBuf::from(message["manifest_path"].as_str().unwrap());
                let binary = PathBuf::from(message["filenames"][0].as_str().unwrap());
                executables.insert(id, (manifest.parent().unwrap().to_path_buf(), binary));
            }
            Some("build-script-executed") => {
                out_dirs.insert(id, PathBuf::from(message["out_dir"].as_str().unwrap()));
            }
            _ => {}
        }
    }
    let scripts: BTreeMap<PathBuf, (PathBuf, PathBuf)> = executables
        .into_iter()
        .filter_map(|(id, (dir, binary))| Some((dir, (binary, out_dirs.get(&id)?.clone()))))
        .collect();
    assert!(
        scripts.len() >= packages.len(),
        "cargo ran {} of the {} build scripts: {}",
        scripts.len(),
        packages.len(),
        String::from_utf8_lossy(&output.stderr)
    );
    scripts
}

/// Runs every genrule of the tree at `root` whose tools are `build.rs` host tools, with cargo's
/// build of those scripts, and returns (genrule, output, what it wrote, what cargo wrote).
fn run_genrules(root: &Path) -> Vec<(String, String, Vec<u8>, Vec<u8>)> {
    let scripts = cargo_build_scripts(&["checkpoint-aidl", "bootctl-hal"]);
    let files = soong::load(root).unwrap();
    let modules: Vec<(&soong::BpFile, &platform_checks::blueprint::Module)> =
        files.iter().flat_map(|f| f.modules.iter().map(move |m| (f, m))).collect();
    let mut results = Vec::new();
    for (_, genrule) in modules.iter().filter(|(_, m)| m.kind == "genrule") {
        let name = genrule.name().unwrap().to_owned();
        let mut tools = BTreeMap::new();
        let mut out_dir = None;
        for tool in genrule.get("tools").and_then(|t| t.as_strings()).unwrap_or_default() {
            let (tool_file, tool_module) =
                modules.iter().find(|(_, m)| m.name() == Some(tool)).expect("tool defined");
            assert_eq!(tool_module.get("crate_root").and_then(|c| c.as_str()), Some("build.rs"));
            let package = platform_checks::workspace_root().join(tool_file.dir());
            let (binary, out) = scripts.get(&package).expect("cargo built this build script");
            tools.insert(tool.to_owned(), binary.clone());
            out_dir = Some(out.clone());
        }
        let out_dir = out_dir.expect("a genrule with a build.rs tool");
        let sandbox = tempfile::tempdir().unwrap();
        let generated = soong::run_genrule(root, &files, &name, &tools, sandbox.path())
            .unwrap_or_else(|e| panic!("{e}"));
        for out in genrule.get("out").and_then(|o| o.as_strings()).unwrap_or_default() {
            let ours = fs::read(generated.join(out)).unwrap();
            let cargos = fs::read(out_dir.join(out)).unwrap();
            results.push((name.clone(), out.to_owned(), ours, cargos));
        }
    }
    results
}

#[test]
fn each_genrule_writes_what_cargo_writes_from_its_declared_inputs_alone() {
    let results = run_genrules(&platform_checks::workspace_root());
    let names: Vec<&str> = results.iter().map(|(n, ..)| n.as_str()).collect();
    assert_eq!(names, ["checkpoint_aidl_rs", "bootctl_hal_rs"]);
    for (name, out, ours, cargos) in &results {
        assert!(ours.len() > 1000, "{name}: {out} is only {} bytes", ours.len());
        assert!(ours == cargos, "{name}: {out} differs from cargo's OUT_DIR/{out}");
    }
}

#[test]
fn a_genrule_missing_an_input_writes_something_else() {
    // Without the frozen version's .hash in the sandbox, build.rs builds the interface
    // unversioned: the code differs from cargo's.
    let tree = copy_of_tree();
    let version = newest_frozen_version(tree.path());
    edit(
        tree.path(),
        "aidl/Android.bp",
        &format!("        \"aidl_api/android.system.checkpoint/{version}/.hash\",\n"),
        "",
    );
    let results = run_genrules(tree.path());
    let (_, _, ours, cargos) = results.iter().find(|(n, ..)| n == "checkpoint_aidl_rs").unwrap();
    assert!(ours != cargos, "the generated code did not change without its .hash input");
}
