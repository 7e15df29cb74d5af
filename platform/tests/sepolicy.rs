//! sepolicy/ compiled with `checkpolicy` and searched with `sesearch` / `seinfo` (setools), the
//! tools integrators use (../shared/reference/integration-tools.md).
//!
//! The policy.conf is m4 over the stub base (sepolicy/tests/base: classes, initial SIDs, AOSP's
//! macro names with stub bodies, the Android-like types our files name, a model of the AOSP
//! neverallows nearest to checkpointd) and every `.te` file of sepolicy/. checkpolicy checks
//! every neverallow and neverallowxperm while it compiles. The compiled policy is dumped once
//! (`sesearch -A`, `sesearch -T`, `seinfo -t -x`) and [`assertions`] asks who may do what, with
//! attributes expanded to their member types: who may find and call the service, who reaches
//! the state files, what the daemon needs and what it must never have.
//!
//! Each kind of failure is shown on a deliberately broken copy of sepolicy/: a violated
//! neverallow, a forbidden ioctl, broken syntax, an undeclared type, a removed allow and an
//! added grant. What cannot be checked here (AOSP's own neverallows, a real device) is listed in
//! sepolicy/README.md.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use platform_checks::{run, tool, workspace_root};

/// The stub base files before the policy's own .te files, in AOSP's policy.conf order.
const BASE_HEAD: &[&str] = &[
    "security_classes",
    "initial_sids",
    "access_vectors",
    "global_macros",
    "neverallow_macros",
    "te_macros",
    "ioctl_defines",
    "mls",
    "base.te",
];
/// The stub base files after them.
const BASE_TAIL: &[&str] = &["roles_users", "contexts"];

/// Policy version: 30 is the first with ioctl allowxperm, and what AOSP compiles to.
const POLICY_VERSION: &str = "30";

/// Domains that may look the service up: its clients, the daemon itself, and the two domains
/// AOSP lets find almost every service (dumpstate for dumpsys, system_app).
const FINDERS: &[&str] = &[
    "apexd",
    "checkpointctl",
    "checkpointd",
    "dumpstate",
    "shell",
    "system_app",
    "system_server",
    "update_engine",
    "vold",
];
/// Domains that may call into checkpointd: its clients, servicemanager (notifications) and the
/// boot HAL server (AOSP lets HAL servers call back their clients).
const CALLERS: &[&str] = &[
    "apexd",
    "checkpointctl",
    "hal_bootctl_default",
    "servicemanager",
    "shell",
    "system_server",
    "update_engine",
    "vold",
];

fn sepolicy_dir() -> PathBuf {
    workspace_root().join("sepolicy")
}

fn base_dir() -> PathBuf {
    sepolicy_dir().join("tests/base")
}

/// The `.te` files of a policy folder, sorted (a device build takes every .te file of a folder).
fn te_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "te"))
        .collect();
    files.sort();
    files
}

/// m4 over the base and `policy_dir`'s .te files, then checkpolicy; the binary policy's path,
/// or the tool's complaint.
fn compile(policy_dir: &Path, out_dir: &Path) -> Result<PathBuf, String> {
    let base = base_dir();
    let te = te_files(policy_dir);
    assert!(!te.is_empty(), "no .te files in {}", policy_dir.display());
    let mut inputs: Vec<PathBuf> = BASE_HEAD.iter().map(|f| base.join(f)).collect();
    inputs.extend(te);
    inputs.extend(BASE_TAIL.iter().map(|f| base.join(f)));

    let m4 = run(Command::new(tool("m4")).arg("--fatal-warnings").args(&inputs));
    if !m4.status.success() {
        return Err(format!("m4 failed: {}", String::from_utf8_lossy(&m4.stderr)));
    }
    let conf = out_dir.join("policy.conf");
    fs::write(&conf, &m4.stdout).expect("write policy.conf");
    let binary = out_dir.join("policy");
    let out = run(Command::new(tool("checkpolicy"))
        .args(["-M", "-c", POLICY_VERSION, "-o"])
        .arg(&binary)
        .arg(&conf));
    if !out.status.success() {
        return Err(format!(
            "checkpolicy failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(binary)
}

/// One `allow` rule of the compiled policy (one class per rule in a binary policy).
#[derive(Debug)]
struct Rule {
    source: String,
    target: String,
    class: String,
    perms: BTreeSet<String>,
}

/// One `allowxperm ... ioctl` rule, its numbers expanded.
#[derive(Debug)]
struct XpermRule {
    source: String,
    target: String,
    class: String,
    ioctls: BTreeSet<u16>,
}

/// What the compiled policy allows, dumped once by the setools commands.
struct Facts {
    allows: Vec<Rule>,
    xperms: Vec<XpermRule>,
    /// `type_transition` rules: (source, target, class, new type).
    transitions: Vec<(String, String, String, String)>,
    /// Every type with its attributes.
    types: BTreeMap<String, BTreeSet<String>>,
}

fn tool_stdout(command: &mut Command) -> String {
    let out = run(command);
    assert!(out.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("setools prints UTF-8")
}

/// The words of a rule line without punctuation: `allow a b:c { x y };` → [allow, a, b:c, x, y].
fn words(line: &str) -> Vec<&str> {
    line.split(|c: char| c.is_whitespace() || "{};".contains(c)).filter(|w| !w.is_empty()).collect()
}

fn split_target(word: &str) -> (String, String) {
    let (target, class) = word.split_once(':').unwrap_or_else(|| panic!("no class in {word}"));
    (target.to_owned(), class.to_owned())
}

/// `0xfd0b-0xfd0d` or `0x1268` → the numbers.
fn ioctl_range(word: &str) -> impl Iterator<Item = u16> {
    let parse = |s: &str| {
        u16::from_str_radix(s.trim_start_matches("0x"), 16)
            .unwrap_or_else(|e| panic!("ioctl number {s}: {e}"))
    };
    let (low, high) = match word.split_once('-') {
        Some((a, b)) => (parse(a), parse(b)),
        None => (parse(word), parse(word)),
    };
    low..=high
}

impl Facts {
    fn load(policy: &Path) -> Facts {
        let mut allows = Vec::new();
        let mut xperms = Vec::new();
        let dump = tool_stdout(Command::new(tool("sesearch")).arg("-A").arg(policy));
        for line in dump.lines().filter(|l| !l.trim().is_empty()) {
            let w = words(line);
            let (target, class) = split_target(w[2]);
            match w[0] {
                "allow" => allows.push(Rule {
                    source: w[1].to_owned(),
                    target,
                    class,
                    perms: w[3..].iter().map(|p| p.to_string()).collect(),
                }),
                "allowxperm" => {
                    assert_eq!(w[3], "ioctl", "unexpected extended permission in {line}");
                    xperms.push(XpermRule {
                        source: w[1].to_owned(),
                        target,
                        class,
                        ioctls: w[4..].iter().flat_map(|r| ioctl_range(r)).collect(),
                    })
                }
                other => panic!("unexpected rule kind {other} in {line}"),
            }
        }
        let dump = tool_stdout(Command::new(tool("sesearch")).arg("-T").arg(policy));
        let transitions = dump
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let w = words(line);
                assert_eq!(w[0], "type_transition", "{line}");
                let (target, class) = split_target(w[2]);
                (w[1].to_owned(), target, class, w[3].to_owned())
            })
            .collect();
        let mut types = BTreeMap::new();
        let dump = tool_stdout(Command::new(tool("seinfo")).arg(policy).args(["-t", "-x"]));
        for line in dump.lines().map(str::trim).filter(|l| l.starts_with("type ")) {
            let mut names =
                line["type ".len()..].trim_end_matches(';').split(',').map(|s| s.trim().to_owned());
            let name = names.next().expect("type name");
            types.insert(name, names.collect::<BTreeSet<_>>());
        }
        assert!(types.contains_key("checkpointd"), "seinfo listed no checkpointd type:\n{dump}");
        Facts { allows, xperms, transitions, types }
    }

    /// Whether `name` (a type or an attribute, as a rule names it) covers type `ty`.
    fn covers(&self, name: &str, ty: &str) -> bool {
        name == ty || self.types.get(ty).is_some_and(|attrs| attrs.contains(name))
    }

    /// Types carrying `attribute`.
    fn members(&self, attribute: &str) -> BTreeSet<String> {
        self.types.iter().filter(|(_, a)| a.contains(attribute)).map(|(t, _)| t.clone()).collect()
    }

    /// Permissions `source` has on `target`'s objects of `class`.
    fn perms(&self, source: &str, target: &str, class: &str) -> BTreeSet<String> {
        self.allows
            .iter()
            .filter(|r| r.class == class && self.covers(&r.source, source))
            .filter(|r| self.covers(&r.target, target))
            .flat_map(|r| r.perms.iter().cloned())
            .collect()
    }

    /// Domains with `perm` on `target`'s `class` objects (`None`: any permission).
    fn who(&self, target: &str, class: &str, perm: Option<&str>) -> BTreeSet<String> {
        self.members("domain")
            .into_iter()
            .filter(|d| {
                let perms = self.perms(d, target, class);
                perm.map_or(!perms.is_empty(), |p| perms.contains(p))
            })
            .collect()
    }

    /// Types whose `class` objects `source` has `perm` on (`None`: any permission).
    fn targets(&self, source: &str, class: &str, perm: Option<&str>) -> BTreeSet<String> {
        self.types
            .keys()
            .filter(|t| {
                let perms = self.perms(source, t, class);
                perm.map_or(!perms.is_empty(), |p| perms.contains(p))
            })
            .cloned()
            .collect()
    }

    /// Classes `source` has any permission on, over all targets.
    fn classes(&self, source: &str) -> BTreeSet<String> {
        self.allows
            .iter()
            .filter(|r| self.covers(&r.source, source))
            .map(|r| r.class.clone())
            .collect()
    }

    /// The ioctls `source` may issue on `target`'s `class` objects (empty: no allowxperm, in
    /// which case the `ioctl` permission alone would allow them all).
    fn ioctls(&self, source: &str, target: &str, class: &str) -> BTreeSet<u16> {
        self.xperms
            .iter()
            .filter(|r| r.class == class && self.covers(&r.source, source))
            .filter(|r| self.covers(&r.target, target))
            .flat_map(|r| r.ioctls.iter().copied())
            .collect()
    }

    fn transition(&self, source: &str, exec: &str) -> Option<&str> {
        self.transitions
            .iter()
            .find(|(s, t, c, _)| self.covers(s, source) && t == exec && c == "process")
            .map(|(_, _, _, new)| new.as_str())
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Collects failed expectations, each a sentence naming what broke.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }

    fn equal(&mut self, what: &str, got: BTreeSet<String>, want: BTreeSet<String>) {
        let missing: Vec<_> = want.difference(&got).collect();
        let extra: Vec<_> = got.difference(&want).collect();
        self.check(missing.is_empty() && extra.is_empty(), || {
            format!("{what}: missing {missing:?}, unexpected {extra:?}")
        });
    }

    fn has(&mut self, what: &str, got: BTreeSet<String>, needed: &[&str]) {
        let missing: Vec<_> = needed.iter().filter(|p| !got.contains(**p)).collect();
        self.check(missing.is_empty(), || format!("{what}: lacks {missing:?} (has {got:?})"));
    }

    fn none(&mut self, what: &str, got: BTreeSet<String>) {
        self.check(got.is_empty(), || format!("{what}: unexpected {got:?}"));
    }
}

/// Every expectation on the compiled policy; the failed ones, as sentences.
fn assertions(f: &Facts) -> Vec<String> {
    let mut fail = Failures::default();
    who_reaches_the_service(f, &mut fail);
    who_reaches_the_state(f, &mut fail);
    what_the_daemon_needs(f, &mut fail);
    what_the_daemon_must_never_have(f, &mut fail);
    what_checkpointctl_has(f, &mut fail);
    fail.0
}

const D: &str = "checkpointd";

/// SELinux gates only the lookup and the call, per domain (never per method).
fn who_reaches_the_service(f: &Facts, fail: &mut Failures) {
    let d = D;
    fail.equal(
        "registers checkpointd_service",
        f.who("checkpointd_service", "service_manager", Some("add")),
        set(&[d]),
    );
    fail.equal(
        "finds checkpointd_service",
        f.who("checkpointd_service", "service_manager", Some("find")),
        set(FINDERS),
    );
    fail.equal("calls checkpointd over binder", f.who(d, "binder", Some("call")), set(CALLERS));
    fail.equal(
        "checkpointd calls",
        f.targets(d, "binder", Some("call")),
        set(&["hal_bootctl_default", "servicemanager", "shell", "system_server", "update_engine"]),
    );
    fail.equal(
        "checkpointd finds",
        f.targets(d, "service_manager", Some("find")),
        set(&["checkpointd_service", "hal_bootctl_service"]),
    );
}

/// Only checkpointd (and init) reach /metadata/checkpointd and give the commit signal.
fn who_reaches_the_state(f: &Facts, fail: &mut Failures) {
    let d = D;
    for class in ["dir", "file", "lnk_file", "sock_file", "fifo_file"] {
        fail.equal(
            &format!("reaches checkpointd_metadata_file:{class}"),
            f.who("checkpointd_metadata_file", class, None),
            if matches!(class, "dir" | "file") { set(&["checkpointd", "init"]) } else { set(&[]) },
        );
    }
    fail.has(
        "checkpointd on its state folder",
        f.perms(d, "checkpointd_metadata_file", "dir"),
        &["search", "open", "read", "write", "add_name", "remove_name", "create"],
    );
    fail.has(
        "checkpointd on its state files (SQLite, records renamed into place)",
        f.perms(d, "checkpointd_metadata_file", "file"),
        &["create", "open", "read", "write", "lock", "rename", "unlink", "getattr"],
    );
    fail.equal(
        "reads checkpointd_prop",
        f.who("checkpointd_prop", "file", Some("read")),
        set(&[d, "vold"]),
    );
    fail.equal(
        "sets checkpointd_prop",
        f.who("checkpointd_prop", "property_service", Some("set")),
        set(&[d, "init"]),
    );
}

/// Each access the daemon's code makes on Android (sepolicy/checkpointd.te gives the reasons).
fn what_the_daemon_needs(f: &Facts, fail: &mut Failures) {
    let d = D;
    fail.check(f.transition("init", "checkpointd_exec") == Some(d), || {
        "init does not start checkpointd_exec in the checkpointd domain".into()
    });
    fail.has(
        "checkpointd on checkpointd_exec",
        f.perms(d, "checkpointd_exec", "file"),
        &["entrypoint"],
    );
    fail.has(
        "checkpointd on the raw userdata device (restoreCheckpoint)",
        f.perms(d, "userdata_block_device", "blk_file"),
        &["open", "read", "write"],
    );
    fail.equal(
        "checkpointd's ioctls on the raw userdata device",
        to_hex(f.ioctls(d, "userdata_block_device", "blk_file")),
        to_hex([0x1268].into()), // BLKSSZGET
    );
    fail.has(
        "checkpointd on the dm-bow device (block 0)",
        f.perms(d, "dm_device", "blk_file"),
        &["open", "read", "write"],
    );
    fail.check(!f.perms(d, "dm_device", "blk_file").contains("ioctl"), || {
        "checkpointd may issue ioctls on dm block devices".into()
    });
    fail.has(
        "checkpointd on /dev/device-mapper",
        f.perms(d, "dm_device", "chr_file"),
        &["open", "read", "write", "ioctl"],
    );
    fail.equal(
        "checkpointd's device-mapper ioctls (read-only: version, list, status, deps, table, versions, target version)",
        to_hex(f.ioctls(d, "dm_device", "chr_file")),
        to_hex([0xfd00, 0xfd02, 0xfd07, 0xfd0b, 0xfd0c, 0xfd0d, 0xfd11].into()),
    );
    fail.has(
        "checkpointd on sysfs_dm files (bow/state, bow/free, dm/name)",
        f.perms(d, "sysfs_dm", "file"),
        &["open", "read", "write"],
    );
    fail.has(
        "checkpointd on sysfs_dm folders (slaves/)",
        f.perms(d, "sysfs_dm", "dir"),
        &["search", "open", "read"],
    );
    fail.has("checkpointd on /sys/dev/block links", f.perms(d, "sysfs", "lnk_file"), &["read"]);
    fail.has(
        "checkpointd on the /data root",
        f.perms(d, "system_data_root_file", "dir"),
        &["open", "read", "ioctl"],
    );
    fail.equal(
        "checkpointd's ioctls on /data (FIFREEZE, FITHAW, FITRIM)",
        to_hex(f.ioctls(d, "system_data_root_file", "dir")),
        to_hex([0x5877, 0x5878, 0x5879].into()),
    );
    fail.equal(
        "checkpointd on /data's file system",
        f.perms(d, "labeledfs", "filesystem"),
        set(&["getattr", "remount"]),
    );
    fail.equal(
        "properties checkpointd sets",
        f.targets(d, "property_service", Some("set")),
        set(&["checkpointd_prop", "powerctl_prop"]),
    );
    fail.equal("checkpointd's capabilities", f.perms(d, d, "capability"), set(&["sys_admin"]));
    fail.none("checkpointd's capability2", f.perms(d, d, "capability2"));
}

fn what_the_daemon_must_never_have(f: &Facts, fail: &mut Failures) {
    let d = D;
    fail.equal(
        "files checkpointd may execute",
        f.targets(d, "file", Some("execute")),
        set(&["checkpointd_exec", "system_file"]),
    );
    fail.none(
        "files checkpointd may run without a transition",
        f.targets(d, "file", Some("execute_no_trans")),
    );
    for ty in f.members("system_file_type").iter().chain(&f.members("vendor_file_type")) {
        for class in ["dir", "file", "lnk_file"] {
            let writes: BTreeSet<String> = f
                .perms(d, ty, class)
                .into_iter()
                .filter(|p| {
                    [
                        "write",
                        "append",
                        "create",
                        "unlink",
                        "rename",
                        "setattr",
                        "add_name",
                        "remove_name",
                        "rmdir",
                    ]
                    .contains(&p.as_str())
                })
                .collect();
            fail.none(&format!("checkpointd writes to {ty}:{class}"), writes);
        }
    }
    for ty in f.members("data_file_type") {
        let perms = f
            .perms(d, &ty, "dir")
            .into_iter()
            .chain(f.perms(d, &ty, "file"))
            .collect::<BTreeSet<_>>();
        let allowed = if ty == "system_data_root_file" {
            set(&["getattr", "ioctl", "open", "read", "search"])
        } else {
            set(&["getattr", "search"])
        };
        let extra: BTreeSet<String> = perms.difference(&allowed).cloned().collect();
        fail.none(
            &format!("checkpointd on data files {ty} (nothing in /data but the root's ioctls)"),
            extra,
        );
    }
    let sockets: BTreeSet<String> = f
        .classes(d)
        .into_iter()
        .filter(|c| c.ends_with("socket") && !c.starts_with("unix_"))
        .collect();
    fail.none("checkpointd's network and netlink sockets", sockets);
    fail.equal(
        "block devices checkpointd may write",
        f.targets(d, "blk_file", Some("write")),
        set(&["dm_device", "userdata_block_device"]),
    );
    fail.none(
        "block nodes checkpointd may create (mknod)",
        f.targets(d, "blk_file", Some("create")),
    );
    fail.none("character nodes checkpointd may create", f.targets(d, "chr_file", Some("create")));
    for loop_type in ["loop_device", "loop_control_device"] {
        for class in ["blk_file", "chr_file"] {
            fail.none(&format!("checkpointd on {loop_type}:{class}"), f.perms(d, loop_type, class));
        }
    }
    fail.none(
        "checkpointd's system permissions (module loading, syslog)",
        f.targets(d, "system", None),
    );
    fail.none(
        "checkpointd's security permissions (policy, enforcing)",
        f.targets(d, "security", None),
    );
    fail.none("files checkpointd may relabel", f.targets(d, "file", Some("relabelto")));
    fail.equal(
        "kmsg for checkpointd (error hints)",
        f.perms(d, "kmsg_device", "chr_file"),
        set(&["getattr", "open", "read"]),
    );
}

/// checkpointctl: binder to the daemon and kmsg; no device, mount or capability.
fn what_checkpointctl_has(f: &Facts, fail: &mut Failures) {
    let c = "checkpointctl";
    fail.check(f.transition("init", "checkpointctl_exec") == Some(c), || {
        "init does not run checkpointctl_exec in the checkpointctl domain".into()
    });
    fail.check(f.transition("shell", "checkpointctl_exec").is_none(), || {
        "shell transitions into checkpointctl (the daemon must see shell's UID and domain)".into()
    });
    fail.has(
        "shell on checkpointctl_exec",
        f.perms("shell", "checkpointctl_exec", "file"),
        &["execute", "execute_no_trans"],
    );
    fail.equal(
        "checkpointctl calls",
        f.targets(c, "binder", Some("call")),
        set(&["checkpointd", "servicemanager"]),
    );
    fail.equal(
        "checkpointctl finds",
        f.targets(c, "service_manager", Some("find")),
        set(&["checkpointd_service"]),
    );
    fail.equal(
        "checkpointctl on kmsg (logs while init is its parent)",
        f.perms(c, "kmsg_device", "chr_file"),
        set(&["append", "getattr", "open", "write"]),
    );
    for class in ["blk_file", "filesystem", "capability"] {
        fail.none(&format!("checkpointctl's {class} permissions"), f.targets(c, class, None));
    }
    fail.none("checkpointctl on /dev/device-mapper", f.perms(c, "dm_device", "chr_file"));
}

fn to_hex(ioctls: BTreeSet<u16>) -> BTreeSet<String> {
    ioctls.into_iter().map(|n| format!("{n:#06x}")).collect()
}

/// The shipped policy, compiled and dumped once for all tests of this file.
struct Shipped {
    policy: PathBuf,
    facts: Facts,
}

fn shipped() -> &'static Shipped {
    static SHIPPED: OnceLock<Shipped> = OnceLock::new();
    SHIPPED.get_or_init(|| {
        let out = scratch("shipped");
        let policy = compile(&sepolicy_dir(), &out).unwrap_or_else(|e| panic!("{e}"));
        let facts = Facts::load(&policy);
        Shipped { policy, facts }
    })
}

/// An empty folder for one test under cargo's per-target scratch space.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sepolicy").join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// A copy of sepolicy/'s top-level files in a scratch folder, with `edit` applied to `file`.
fn broken_copy(name: &str, file: &str, edit: impl FnOnce(String) -> String) -> PathBuf {
    let dir = scratch(name);
    let copy = dir.join("sepolicy");
    fs::create_dir_all(&copy).expect("copy folder");
    for entry in fs::read_dir(sepolicy_dir()).expect("sepolicy/") {
        let path = entry.expect("dir entry").path();
        if path.is_file() {
            fs::copy(&path, copy.join(path.file_name().expect("name"))).expect("copy");
        }
    }
    let target = copy.join(file);
    let text = fs::read_to_string(&target).unwrap_or_else(|e| panic!("{}: {e}", target.display()));
    let edited = edit(text.clone());
    assert_ne!(edited, text, "the edit of {file} changed nothing");
    fs::write(&target, edited).expect("write edited copy");
    copy
}

/// `text` without its lines that contain `needle` (there must be some).
fn without_lines(text: String, needle: &str) -> String {
    let kept: Vec<&str> = text.lines().filter(|l| !l.contains(needle)).collect();
    assert!(kept.len() < text.lines().count(), "no line contains {needle:?}");
    kept.join("\n") + "\n"
}

#[test]
fn the_shipped_policy_compiles_and_every_assertion_holds() {
    let failures = assertions(&shipped().facts);
    assert!(failures.is_empty(), "sepolicy assertions failed:\n  {}", failures.join("\n  "));
}

#[test]
fn the_evaluator_agrees_with_sesearch_on_every_domain() {
    // The assertions expand attributes themselves; asked domain by domain who may call
    // checkpointd and find its service, sesearch's own matching must give the same sets.
    let shipped = shipped();
    let asks = |source: &str, target: &str, class: &str, perm: &str| {
        let out = tool_stdout(
            Command::new(tool("sesearch"))
                .args(["-A", "-s", source, "-t", target, "-c", class, "-p", perm])
                .arg(&shipped.policy),
        );
        !out.trim().is_empty()
    };
    let domains = shipped.facts.members("domain");
    assert!(domains.len() > 10, "{domains:?}");
    for (target, class, perm) in
        [("checkpointd", "binder", "call"), ("checkpointd_service", "service_manager", "find")]
    {
        let by_sesearch: BTreeSet<String> = std::thread::scope(|scope| {
            let asked: Vec<_> = domains
                .iter()
                .map(|d| scope.spawn(move || asks(d, target, class, perm).then(|| d.clone())))
                .collect();
            asked.into_iter().filter_map(|h| h.join().expect("sesearch thread")).collect()
        });
        let by_evaluator = shipped.facts.who(target, class, Some(perm));
        assert_eq!(by_evaluator, by_sesearch, "{target}:{class} {perm}");
    }
}

/// The `(path or name, type)` pairs of a contexts file.
fn contexts(file: &str) -> Vec<(String, String)> {
    let path = sepolicy_dir().join(file);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let context = fields.get(1).unwrap_or_else(|| panic!("{file}: no context in {line}"));
            let parts: Vec<&str> = context.split(':').collect();
            assert!(
                parts.len() == 4 && parts[0] == "u" && parts[1] == "object_r" && parts[3] == "s0",
                "{file}: context {context} is not u:object_r:<type>:s0"
            );
            (fields[0].to_owned(), parts[2].to_owned())
        })
        .collect()
}

#[test]
fn every_label_names_a_type_of_the_right_kind() {
    let f = &shipped().facts;
    for (file, attribute) in [
        ("file_contexts", "file_type"),
        ("service_contexts", "service_manager_type"),
        ("property_contexts", "property_type"),
    ] {
        let entries = contexts(file);
        assert!(!entries.is_empty(), "{file} is empty");
        for (name, ty) in entries {
            let attrs = f
                .types
                .get(&ty)
                .unwrap_or_else(|| panic!("{file}: {name} has undeclared type {ty}"));
            assert!(attrs.contains(attribute), "{file}: {name}'s type {ty} is not a {attribute}");
        }
    }
    let exec = contexts("file_contexts");
    for (path, ty) in [
        ("/system/bin/checkpointd", "checkpointd_exec"),
        ("/system/bin/checkpointctl", "checkpointctl_exec"),
    ] {
        assert!(
            exec.contains(&(path.to_owned(), ty.to_owned())),
            "file_contexts lacks {path} {ty}"
        );
        assert!(f.types[ty].contains("exec_type"), "{ty} is not an exec_type");
    }
}

/// Reads `name: &str = "value"` from a source file.
fn rust_const(file: &str, name: &str) -> String {
    let path = workspace_root().join(file);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let rest = text
        .split_once(&format!("{name}: &str = \""))
        .unwrap_or_else(|| panic!("{file} has no const {name}"))
        .1;
    rest.split('"').next().expect("closing quote").to_owned()
}

#[test]
fn the_labels_match_what_the_code_and_the_rc_file_use() {
    let service = rust_const("aidl/src/lib.rs", "SERVICE_NAME");
    assert!(
        contexts("service_contexts").contains(&(service.clone(), "checkpointd_service".into())),
        "service_contexts does not label {service}"
    );
    let property = rust_const("service/src/notify.rs", "COMMITTED_PROPERTY");
    let props = contexts("property_contexts");
    assert!(
        props.contains(&(property.clone(), "checkpointd_prop".into())),
        "property_contexts does not label {property}"
    );

    // The state folder: the daemon's default metadata_dir and init's mkdir, labelled with the
    // file_contexts regex (a literal prefix plus `(/.*)?`).
    let files = contexts("file_contexts");
    let (state_regex, _) = files
        .iter()
        .find(|(_, ty)| ty == "checkpointd_metadata_file")
        .expect("file_contexts labels the state folder");
    let state_dir =
        state_regex.strip_suffix("(/.*)?").expect("the state folder's entry covers its contents");
    let config =
        fs::read_to_string(workspace_root().join("service/src/config.rs")).expect("config.rs");
    assert!(
        config.contains(&format!("metadata_dir: PathBuf::from(\"{state_dir}\")")),
        "the daemon's default metadata_dir is not {state_dir}"
    );
    let rc =
        fs::read_to_string(workspace_root().join("init/checkpointd.rc")).expect("checkpointd.rc");
    assert!(
        rc.lines()
            .any(|l| l.trim().starts_with("mkdir ")
                && l.split_whitespace().nth(1) == Some(state_dir)),
        "init/checkpointd.rc does not mkdir {state_dir}"
    );
    // Every program the rc file runs from /system/bin has a label.
    for word in
        rc.lines().filter(|l| !l.trim_start().starts_with('#')).flat_map(str::split_whitespace)
    {
        if word.starts_with("/system/bin/") {
            assert!(
                files.iter().any(|(path, _)| path == word),
                "file_contexts does not label {word}, which init/checkpointd.rc runs"
            );
        }
    }
}

/// `_IOC(dir, type, nr, size)` as the kernel encodes it (asm-generic/ioctl.h).
fn ioc(dir: u32, ty: u32, nr: u32, size: u32) -> u32 {
    dir << 30 | size << 16 | ty << 8 | nr
}

#[test]
fn the_stub_ioctl_numbers_are_the_kernels() {
    const NONE: u32 = 0;
    const READ_WRITE: u32 = 3;
    const DM_IOCTL_SIZE: u32 = 312; // struct dm_ioctl
    let dm = |nr| ioc(READ_WRITE, 0xfd, nr, DM_IOCTL_SIZE);
    let expected: BTreeMap<&str, u32> = [
        ("BLKSSZGET", ioc(NONE, 0x12, 104, 0)),
        ("BLKDISCARD", ioc(NONE, 0x12, 119, 0)),
        ("FIFREEZE", ioc(READ_WRITE, u32::from(b'X'), 119, 4)),
        ("FITHAW", ioc(READ_WRITE, u32::from(b'X'), 120, 4)),
        ("FITRIM", ioc(READ_WRITE, u32::from(b'X'), 121, 24)), // struct fstrim_range
        ("DM_VERSION", dm(0)),
        ("DM_REMOVE_ALL", dm(1)),
        ("DM_LIST_DEVICES", dm(2)),
        ("DM_DEV_CREATE", dm(3)),
        ("DM_DEV_REMOVE", dm(4)),
        ("DM_DEV_RENAME", dm(5)),
        ("DM_DEV_SUSPEND", dm(6)),
        ("DM_DEV_STATUS", dm(7)),
        ("DM_DEV_WAIT", dm(8)),
        ("DM_TABLE_LOAD", dm(9)),
        ("DM_TABLE_CLEAR", dm(10)),
        ("DM_TABLE_DEPS", dm(11)),
        ("DM_TABLE_STATUS", dm(12)),
        ("DM_LIST_VERSIONS", dm(13)),
        ("DM_TARGET_MSG", dm(14)),
        ("DM_DEV_SET_GEOMETRY", dm(15)),
    ]
    .into();
    let text = fs::read_to_string(base_dir().join("ioctl_defines")).expect("ioctl_defines");
    let mut defined = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("define(")) {
        let parts: Vec<&str> = line.split(['`', '\'']).collect();
        let (name, value) = (parts[1], parts[3]);
        let number = u32::from_str_radix(value.trim_start_matches("0x"), 16).expect("hex number");
        defined.insert(name, number);
    }
    assert_eq!(
        defined.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "names defined"
    );
    for (name, want) in expected {
        assert_eq!(
            defined[name], want,
            "{name}: {:#010x} defined, the kernel's is {want:#010x}",
            defined[name]
        );
    }
}

#[test]
fn a_violated_neverallow_fails_the_build() {
    let copy = broken_copy("neverallow", "checkpointd.te", |t| {
        t + "allow untrusted_app checkpointd_metadata_file:file read;\n"
    });
    let err =
        compile(&copy, copy.parent().expect("scratch")).expect_err("a neverallow was violated");
    assert!(err.contains("neverallow") && err.contains("untrusted_app"), "{err}");
}

#[test]
fn a_forbidden_ioctl_fails_the_build() {
    let copy = broken_copy("neverallowxperm", "checkpointd.te", |t| {
        t + "allowxperm checkpointd dm_device:chr_file ioctl DM_DEV_CREATE;\n"
    });
    let err = compile(&copy, copy.parent().expect("scratch"))
        .expect_err("a neverallowxperm was violated");
    assert!(err.contains("neverallow"), "{err}");
}

#[test]
fn broken_syntax_fails_the_build() {
    let copy = broken_copy("syntax", "service.te", |t| {
        t.replace("service_manager_type;", "service_manager_type")
    });
    let err = compile(&copy, copy.parent().expect("scratch")).expect_err("a missing semicolon");
    assert!(err.contains("syntax error"), "{err}");
}

#[test]
fn an_undeclared_type_fails_the_build() {
    let copy = broken_copy("undeclared", "checkpointd.te", |t| {
        t.replace(
            "allow checkpointd sysfs_dm:file write;",
            "allow checkpointd sysfs_dmm:file write;",
        )
    });
    let err = compile(&copy, copy.parent().expect("scratch")).expect_err("an undeclared type");
    assert!(err.contains("sysfs_dmm"), "{err}");
}

#[test]
fn a_removed_allow_fails_an_assertion() {
    let copy = broken_copy("removed", "checkpointd.te", |t| {
        let t = without_lines(t, "binder_call(apexd, checkpointd)");
        without_lines(t, "allow checkpointd sysfs_dm:file write;")
    });
    let out = copy.parent().expect("scratch").to_owned();
    let policy =
        compile(&copy, &out).unwrap_or_else(|e| panic!("the copy should still compile: {e}"));
    let failures = assertions(&Facts::load(&policy));
    let text = failures.join("\n");
    assert!(text.contains("calls checkpointd over binder") && text.contains("apexd"), "{text}");
    assert!(text.contains("sysfs_dm files") && text.contains("write"), "{text}");
}

#[test]
fn an_added_grant_fails_an_assertion() {
    // Grants no neverallow forbids, which only the assertions catch.
    let copy = broken_copy("added", "checkpointd.te", |t| {
        t + "allow checkpointd self:capability dac_override;\n\
             allow checkpointd system_file:file write;\n\
             allow checkpointd self:netlink_kobject_uevent_socket create;\n"
    });
    let out = copy.parent().expect("scratch").to_owned();
    let policy =
        compile(&copy, &out).unwrap_or_else(|e| panic!("the copy should still compile: {e}"));
    let text = assertions(&Facts::load(&policy)).join("\n");
    for expected in
        ["checkpointd's capabilities", "writes to system_file:file", "network and netlink sockets"]
    {
        assert!(text.contains(expected), "no failure about {expected}:\n{text}");
    }
}
