//! Checks of the tree's Soong files (Android.bp) that no Soong build can run here:
//! - every file a module names exists (globs match something; nothing escapes its folder);
//! - every module a module names is defined in the tree or listed in `android/aosp-modules.toml`
//!   with where it comes from;
//! - each crate's Soong dependencies are its Cargo dependencies (`lib<crate>` naming, with the
//!   exceptions that file lists);
//! - each workspace member has Soong modules or is listed as host-only tooling;
//! - each `aidl_interface`'s frozen versions have their API dump and `.hash`.
//!
//! [`bpfmt_problems`] adds Soong's own parser and formatter (`bpfmt`). Every check returns the
//! problems it found as readable lines (`file:line: module: what`), empty when all is well.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use crate::blueprint::{self, Module, Value};

/// The file listing the modules the tree uses but does not define.
pub const EXTERNAL_MODULES: &str = "android/aosp-modules.toml";

/// Properties that name files (relative to the module's folder) or, with a `:` prefix, modules.
const FILE_PROPERTIES: &[&str] = &[
    "srcs",
    "crate_root",
    "init_rc",
    "vintf_fragments",
    "data",
    "compile_data",
    "tool_files",
    "src",
    "license_text",
];

/// Properties that name modules.
const MODULE_PROPERTIES: &[&str] = &[
    "rustlibs",
    "rlibs",
    "dylibs",
    "proc_macros",
    "shared_libs",
    "static_libs",
    "whole_static_libs",
    "header_libs",
    "defaults",
    "tools",
    "required",
    "host_required",
    "data_libs",
    "data_bins",
    "imports",
    "default_applicable_licenses",
    "licenses",
    "license_kinds",
];

/// The properties through which a Rust module links another Rust crate.
const RUST_DEPENDENCY_PROPERTIES: &[&str] = &["rustlibs", "rlibs", "dylibs", "proc_macros"];

/// One parsed Android.bp file of the tree.
#[derive(Debug)]
pub struct BpFile {
    /// Its path, relative to the tree's root.
    pub path: PathBuf,
    /// Its modules.
    pub modules: Vec<Module>,
}

impl BpFile {
    /// The module folder (paths in the file are relative to it).
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new(""))
    }

    fn at(&self, module: &Module) -> String {
        format!(
            "{}:{}: {}",
            self.path.display(),
            module.line,
            module.name().unwrap_or(&module.kind)
        )
    }
}

/// Every Android.bp under `root` (relative paths, sorted), skipping hidden folders and `target`.
pub fn find_android_bp(root: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, rel: &Path, found: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(root.join(rel)) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let path = rel.join(&*name);
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                if !name.starts_with('.') && name != "target" {
                    walk(root, &path, found);
                }
            } else if name == "Android.bp" {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(root, Path::new(""), &mut found);
    found.sort();
    found
}

/// Parses every Android.bp under `root` with our Blueprint reader.
pub fn load(root: &Path) -> Result<Vec<BpFile>, Vec<String>> {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for path in find_android_bp(root) {
        let text = match fs::read_to_string(root.join(&path)) {
            Ok(text) => text,
            Err(e) => {
                problems.push(format!("{}: cannot read: {e}", path.display()));
                continue;
            }
        };
        match blueprint::parse(&text) {
            Ok(parsed) => files.push(BpFile { path, modules: parsed.modules }),
            Err(e) => problems.push(format!("{}:{e}", path.display())),
        }
    }
    if problems.is_empty() {
        Ok(files)
    } else {
        Err(problems)
    }
}

/// Runs `bpfmt -l` on every file: a parse error (exit 2) or a formatting difference (the file's
/// name printed) is a problem, with bpfmt's message or diff.
pub fn bpfmt_problems(root: &Path, files: &[PathBuf]) -> Vec<String> {
    let bpfmt = crate::tool("bpfmt");
    let mut problems = Vec::new();
    for file in files {
        let output = crate::run(Command::new(&bpfmt).arg("-l").arg(file).current_dir(root));
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            problems.push(format!(
                "{}: bpfmt cannot parse it ({}): {}",
                file.display(),
                output.status,
                stderr.trim()
            ));
        } else if !stdout.trim().is_empty() {
            let diff = crate::run(Command::new(&bpfmt).arg("-d").arg(file).current_dir(root));
            problems.push(format!(
                "{}: not bpfmt-formatted (run `bpfmt -w {}`):\n{}",
                file.display(),
                file.display(),
                String::from_utf8_lossy(&diff.stdout).trim_end()
            ));
        }
    }
    problems
}

/// Every string of `key` properties at any depth of `value` (maps inside maps and lists, such as
/// `target: { android: { rustlibs: [...] } }`).
fn strings_of(value: &Value, keys: &[&str], out: &mut Vec<(String, String)>) {
    match value {
        Value::Map(entries) => {
            for (key, inner) in entries {
                if keys.contains(&key.as_str()) {
                    match inner {
                        Value::String(s) => out.push((key.clone(), s.clone())),
                        Value::List(items) => {
                            for item in items {
                                if let Value::String(s) = item {
                                    out.push((key.clone(), s.clone()));
                                }
                            }
                        }
                        _ => {}
                    }
                }
                strings_of(inner, keys, out);
            }
        }
        Value::List(items) => items.iter().for_each(|item| strings_of(item, keys, out)),
        _ => {}
    }
}

/// `pattern` (Soong glob: `*` within a name, `**` for any folders) matched under `dir`.
fn glob(dir: &Path, pattern: &str) -> Vec<PathBuf> {
    fn matches(pattern: &[char], name: &[char]) -> bool {
        match pattern.split_first() {
            None => name.is_empty(),
            Some(('*', rest)) => (0..=name.len()).any(|i| matches(rest, &name[i..])),
            Some((c, rest)) => name.first() == Some(c) && matches(rest, &name[1..]),
        }
    }
    fn walk(at: &Path, parts: &[&str], found: &mut Vec<PathBuf>) {
        let Some((part, rest)) = parts.split_first() else {
            if at.is_file() {
                found.push(at.to_path_buf());
            }
            return;
        };
        if *part == "**" {
            walk(at, rest, found);
            for entry in fs::read_dir(at).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&entry.path(), parts, found);
                }
            }
        } else if part.contains('*') {
            let pattern: Vec<char> = part.chars().collect();
            for entry in fs::read_dir(at).into_iter().flatten().flatten() {
                let name: Vec<char> = entry.file_name().to_string_lossy().chars().collect();
                if matches(&pattern, &name) {
                    walk(&entry.path(), rest, found);
                }
            }
        } else {
            walk(&at.join(part), rest, found);
        }
    }
    let parts: Vec<&str> = pattern.split('/').collect();
    let mut found = Vec::new();
    walk(dir, &parts, &mut found);
    found
}

/// Every file a module names exists (a glob matches at least one file) inside its module folder,
/// and each `aidl_interface` version has its frozen dump with a `.hash`.
pub fn missing_files(root: &Path, files: &[BpFile]) -> Vec<String> {
    let mut problems = Vec::new();
    for file in files {
        let dir = root.join(file.dir());
        for module in &file.modules {
            let mut named = Vec::new();
            strings_of(&module.as_map(), FILE_PROPERTIES, &mut named);
            for (key, path) in named {
                if path.starts_with(':') {
                    continue; // a module reference: checked by unknown_modules
                }
                let escapes = Path::new(&path)
                    .components()
                    .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
                if escapes {
                    problems.push(format!(
                        "{}: {key} `{path}` is outside the module folder (Soong refuses `..` and absolute paths)",
                        file.at(module)
                    ));
                } else if path.contains('*') {
                    if glob(&dir, &path).is_empty() {
                        problems
                            .push(format!("{}: {key} `{path}` matches no file", file.at(module)));
                    }
                } else if !dir.join(&path).exists() {
                    problems.push(format!("{}: {key} `{path}` does not exist", file.at(module)));
                }
            }
            if module.kind == "aidl_interface" {
                problems.extend(aidl_problems(&dir, file, module));
            }
        }
    }
    problems
}

/// The frozen versions of an `aidl_interface` exist with a non-empty `.hash`.
fn aidl_problems(dir: &Path, file: &BpFile, module: &Module) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(name) = module.name() else { return problems };
    let mut versions = Vec::new();
    if let Some(Value::List(items)) = module.get("versions_with_info") {
        versions.extend(items.iter().filter_map(|i| i.get("version")?.as_str().map(String::from)));
    }
    if let Some(list) = module.get("versions").and_then(Value::as_strings) {
        versions.extend(list.into_iter().map(String::from));
    }
    if module.get("frozen") == Some(&Value::Bool(true)) && versions.is_empty() {
        problems.push(format!("{}: frozen but no versions_with_info", file.at(module)));
    }
    for version in versions {
        let api = dir.join("aidl_api").join(name).join(&version);
        let hash = fs::read_to_string(api.join(".hash")).unwrap_or_default();
        if !api.is_dir() {
            problems.push(format!(
                "{}: version {version} has no frozen dump aidl_api/{name}/{version}/",
                file.at(module)
            ));
        } else if hash.trim().is_empty() {
            problems.push(format!(
                "{}: aidl_api/{name}/{version}/.hash is missing or empty",
                file.at(module)
            ));
        }
    }
    problems
}

/// The modules the tree uses but does not define, from `android/aosp-modules.toml`.
#[derive(Debug, Default)]
pub struct ExternalModules {
    /// AOSP module name → its folder in an AOSP checkout.
    pub aosp: BTreeMap<String, String>,
    /// Module name → (crates.io crate, the folder an integrator drops the vendored crate in).
    pub vendored: BTreeMap<String, (String, String)>,
    /// Cargo crate → Soong module, where the module is not `lib<crate_name>`.
    pub crate_modules: BTreeMap<String, String>,
    /// Cargo crates Soong links without a dependency property (module type adds them) → why.
    pub implicit: BTreeMap<String, String>,
    /// Workspace members with no Soong module → why.
    pub host_only: BTreeMap<String, String>,
}

impl ExternalModules {
    /// Reads `android/aosp-modules.toml` under `root`; every entry must say where it comes from.
    pub fn load(root: &Path) -> Result<ExternalModules, String> {
        let path = root.join(EXTERNAL_MODULES);
        let text = fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let table: toml::Table = text.parse().map_err(|e| format!("{}: {e}", path.display()))?;
        let mut modules = ExternalModules::default();
        for (section, value) in &table {
            let entries = value
                .as_table()
                .ok_or_else(|| format!("{EXTERNAL_MODULES}: [{section}] is not a table"))?;
            for (key, entry) in entries {
                let field = |name: &str| -> Result<String, String> {
                    let found = match entry {
                        toml::Value::String(s) if name.is_empty() => Some(s.as_str()),
                        toml::Value::Table(t) if !name.is_empty() => {
                            t.get(name).and_then(toml::Value::as_str)
                        }
                        _ => None,
                    };
                    match found {
                        Some(s) if !s.trim().is_empty() => Ok(s.to_owned()),
                        _ if name.is_empty() => Err(format!(
                            "{EXTERNAL_MODULES}: [{section}] {key} needs a non-empty string"
                        )),
                        _ => Err(format!("{EXTERNAL_MODULES}: [{section}] {key} needs `{name}`")),
                    }
                };
                let map = match section.as_str() {
                    "aosp" => {
                        // A path, or a table with the path and a note.
                        let path = if entry.is_table() { field("path")? } else { field("")? };
                        modules.aosp.insert(key.clone(), path);
                        continue;
                    }
                    "vendored" => {
                        modules.vendored.insert(key.clone(), (field("crate")?, field("path")?));
                        continue;
                    }
                    "crate_modules" => &mut modules.crate_modules,
                    "implicit" => &mut modules.implicit,
                    "host_only" => &mut modules.host_only,
                    other => return Err(format!("{EXTERNAL_MODULES}: unknown section [{other}]")),
                };
                map.insert(key.clone(), field("")?);
            }
        }
        Ok(modules)
    }

    fn knows(&self, module: &str) -> bool {
        self.aosp.contains_key(module) || self.vendored.contains_key(module)
    }
}

/// Every module a module names is defined in the tree or listed as external; names are defined
/// once; every external entry is used and every vendored crate is one the build really uses.
pub fn unknown_modules(root: &Path, files: &[BpFile], external: &ExternalModules) -> Vec<String> {
    let mut problems = Vec::new();
    let mut defined: BTreeMap<&str, &BpFile> = BTreeMap::new();
    for file in files {
        for module in &file.modules {
            if let Some(name) = module.name() {
                if let Some(first) = defined.insert(name, file) {
                    problems.push(format!(
                        "{}: module `{name}` is also defined in {}",
                        file.at(module),
                        first.path.display()
                    ));
                }
                if external.knows(name) {
                    problems.push(format!(
                        "{}: `{name}` is defined here and also listed in {EXTERNAL_MODULES}",
                        file.at(module)
                    ));
                }
            }
        }
    }
    let mut used = BTreeSet::new();
    for file in files {
        for module in &file.modules {
            let mut named = Vec::new();
            strings_of(&module.as_map(), MODULE_PROPERTIES, &mut named);
            strings_of(&module.as_map(), FILE_PROPERTIES, &mut named);
            for (key, reference) in named {
                let is_module = MODULE_PROPERTIES.contains(&key.as_str());
                let name =
                    if is_module { Some(reference.as_str()) } else { reference.strip_prefix(':') };
                let Some(name) = name else { continue };
                used.insert(name.to_owned());
                if !defined.contains_key(name) && !external.knows(name) {
                    problems.push(format!(
                        "{}: {key} names `{name}`, which no Android.bp here defines and {EXTERNAL_MODULES} does not list",
                        file.at(module)
                    ));
                }
            }
        }
    }
    for name in external.aosp.keys().chain(external.vendored.keys()) {
        if !used.contains(name) {
            problems.push(format!("{EXTERNAL_MODULES}: `{name}` is listed but no module uses it"));
        }
    }
    let lock = fs::read_to_string(root.join("Cargo.lock")).unwrap_or_default();
    for (module, (krate, _)) in &external.vendored {
        if !lock.contains(&format!("name = \"{krate}\"\n")) {
            problems.push(format!(
                "{EXTERNAL_MODULES}: `{module}` vendors crate `{krate}`, which Cargo.lock does not have"
            ));
        }
    }
    problems
}

/// A Cargo package's dependencies as Soong module names.
#[derive(Debug, Default)]
struct CargoDeps {
    /// `lib<crate_name>` of the package's own library.
    own_lib: String,
    normal: BTreeSet<String>,
    dev: BTreeSet<String>,
    build: BTreeSet<String>,
    /// dev-dependency module → its crate identifier in Rust source.
    dev_idents: BTreeMap<String, String>,
}

fn read_toml(path: &Path) -> Result<toml::Table, String> {
    let text =
        fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.parse().map_err(|e| format!("{}: {e}", path.display()))
}

/// The crate identifier of the package at `dir` (its `[lib] name`, else its name with `_`).
fn crate_ident(dir: &Path) -> Result<String, String> {
    let manifest = read_toml(&dir.join("Cargo.toml"))?;
    let lib_name = manifest.get("lib").and_then(|l| l.get("name")).and_then(|n| n.as_str());
    let package = manifest.get("package").and_then(|p| p.get("name")).and_then(|n| n.as_str());
    match lib_name.or(package) {
        Some(name) => Ok(name.replace('-', "_")),
        None => Err(format!("{}: no [package] name", dir.join("Cargo.toml").display())),
    }
}

/// Reads the dependencies of the package at `dir` (relative to `root`, the workspace root whose
/// `[workspace.dependencies]` resolve `x.workspace = true`).
fn cargo_deps(root: &Path, dir: &Path, external: &ExternalModules) -> Result<CargoDeps, String> {
    let manifest = read_toml(&root.join(dir).join("Cargo.toml"))?;
    let workspace = read_toml(&root.join("Cargo.toml"))?;
    let workspace_deps =
        workspace.get("workspace").and_then(|w| w.get("dependencies")).and_then(|d| d.as_table());
    let mut deps = CargoDeps {
        own_lib: format!("lib{}", crate_ident(&root.join(dir))?),
        ..Default::default()
    };

    let mut tables: Vec<(&str, &toml::Table)> = Vec::new();
    for kind in ["dependencies", "dev-dependencies", "build-dependencies"] {
        if let Some(t) = manifest.get(kind).and_then(|t| t.as_table()) {
            tables.push((kind, t));
        }
    }
    // Target-specific tables: Soong builds these crates for Android (and the host), so a
    // `cfg(target_os = "android")` dependency is an ordinary one there.
    if let Some(targets) = manifest.get("target").and_then(|t| t.as_table()) {
        for target in targets.values() {
            for kind in ["dependencies", "dev-dependencies", "build-dependencies"] {
                if let Some(t) = target.get(kind).and_then(|t| t.as_table()) {
                    tables.push((kind, t));
                }
            }
        }
    }
    for (kind, table) in tables {
        for (key, spec) in table {
            let mut spec = spec.clone();
            let mut base = root.join(dir);
            if spec.get("workspace").and_then(|w| w.as_bool()) == Some(true) {
                spec = workspace_deps.and_then(|d| d.get(key)).cloned().ok_or_else(|| {
                    format!("{}: `{key}` is not in [workspace.dependencies]", dir.display())
                })?;
                base = root.to_path_buf();
            }
            let package = spec.get("package").and_then(|p| p.as_str()).unwrap_or(key);
            let (module, ident) = match spec.get("path").and_then(|p| p.as_str()) {
                Some(path) => {
                    let ident = crate_ident(&base.join(path))?;
                    (format!("lib{ident}"), ident)
                }
                None => {
                    let ident = key.replace('-', "_");
                    if external.implicit.contains_key(package) {
                        continue;
                    }
                    let module = external
                        .crate_modules
                        .get(package)
                        .cloned()
                        .unwrap_or_else(|| format!("lib{}", package.replace('-', "_")));
                    (module, ident)
                }
            };
            match kind {
                "dependencies" => deps.normal.insert(module),
                "dev-dependencies" => {
                    deps.dev_idents.insert(module.clone(), ident);
                    deps.dev.insert(module)
                }
                _ => deps.build.insert(module),
            };
        }
    }
    Ok(deps)
}

/// The Rust crates a module links, including those of its `defaults` (recursively).
fn rust_deps(module: &Module, by_name: &BTreeMap<&str, &Module>) -> BTreeSet<String> {
    let mut out = Vec::new();
    strings_of(&module.as_map(), RUST_DEPENDENCY_PROPERTIES, &mut out);
    let mut deps: BTreeSet<String> = out.into_iter().map(|(_, name)| name).collect();
    for default in module.get("defaults").and_then(Value::as_strings).unwrap_or_default() {
        if let Some(defaults) = by_name.get(default) {
            deps.extend(rust_deps(defaults, by_name));
        }
    }
    deps
}

/// A property of a module or of its `defaults`.
fn property<'a>(
    module: &'a Module,
    key: &str,
    by_name: &BTreeMap<&str, &'a Module>,
) -> Option<&'a Value> {
    module.get(key).or_else(|| {
        module
            .get("defaults")
            .and_then(Value::as_strings)
            .unwrap_or_default()
            .into_iter()
            .find_map(|d| property(by_name.get(d)?, key, by_name))
    })
}

/// The nearest folder at or above `path` (relative to `root`) holding a Cargo.toml.
fn package_dir(root: &Path, path: &Path) -> Option<PathBuf> {
    let mut dir = path.parent();
    while let Some(d) = dir {
        if root.join(d).join("Cargo.toml").is_file() {
            return Some(d.to_path_buf());
        }
        dir = d.parent();
    }
    None
}

/// Whether the Rust files under `dir` name the crate `ident`.
fn sources_use(dir: &Path, ident: &str) -> bool {
    glob(dir, "**/*.rs").iter().any(|file| {
        let text = fs::read_to_string(file).unwrap_or_default();
        // `ident::` or `use ident` as a whole word (`nix::` is not inside `unix::`).
        [format!("{ident}::"), format!("use {ident}")].iter().any(|needle| {
            text.match_indices(needle.as_str())
                .any(|(i, _)| !text[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_'))
        })
    })
}

/// Each Rust module's Soong dependencies against its Cargo package:
/// - libraries, binaries and fuzz targets: exactly the `[dependencies]` (a binary may add its
///   own package's library);
/// - a host tool built from `build.rs` (a genrule's generator): exactly `[build-dependencies]`;
/// - a `rust_test`: every `[dependencies]` entry, nothing outside dependencies,
///   dev-dependencies and the own library, and every dev-dependency its sources use.
///
/// Every workspace member must have a Rust module or be listed as host-only.
pub fn cargo_mismatches(root: &Path, files: &[BpFile], external: &ExternalModules) -> Vec<String> {
    let mut problems = Vec::new();
    let by_name: BTreeMap<&str, &Module> =
        files.iter().flat_map(|f| &f.modules).filter_map(|m| Some((m.name()?, m))).collect();
    let mut packages_with_modules = BTreeSet::new();
    for file in files {
        for module in &file.modules {
            if !module.kind.starts_with("rust_") || module.kind == "rust_defaults" {
                continue;
            }
            let at = file.at(module);
            let root_file = property(module, "crate_root", &by_name)
                .and_then(Value::as_str)
                .map(String::from)
                .or_else(|| {
                    property(module, "srcs", &by_name)?
                        .as_strings()?
                        .into_iter()
                        .find(|s| !s.starts_with(':'))
                        .map(String::from)
                });
            let Some(root_file) = root_file else {
                problems.push(format!("{at}: names no crate root"));
                continue;
            };
            let crate_root = file.dir().join(&root_file);
            let Some(package) = package_dir(root, &crate_root) else {
                problems
                    .push(format!("{at}: {} belongs to no Cargo package", crate_root.display()));
                continue;
            };
            packages_with_modules.insert(package.clone());
            let cargo = match cargo_deps(root, &package, external) {
                Ok(cargo) => cargo,
                Err(e) => {
                    problems.push(format!("{at}: {e}"));
                    continue;
                }
            };
            let soong = rust_deps(module, &by_name);
            let manifest = package.join("Cargo.toml");
            let manifest = manifest.display();
            let is_build_tool = crate_root == package.join("build.rs");
            let mut report =
                |missing: Vec<&String>, extra: Vec<&String>, has: &str, allowed: &str| {
                    for m in missing {
                        problems.push(format!("{at}: lacks `{m}`, which {manifest} has in {has}"));
                    }
                    for e in extra {
                        problems.push(format!(
                            "{at}: has `{e}`, which is not in {allowed} of {manifest}"
                        ));
                    }
                };
            if is_build_tool {
                report(
                    cargo.build.difference(&soong).collect(),
                    soong.difference(&cargo.build).collect(),
                    "[build-dependencies]",
                    "[build-dependencies]",
                );
            } else if module.kind == "rust_test" || module.kind == "rust_test_host" {
                let allowed: BTreeSet<&String> = cargo
                    .normal
                    .iter()
                    .chain(&cargo.dev)
                    .chain(std::iter::once(&cargo.own_lib))
                    .collect();
                report(
                    cargo.normal.difference(&soong).collect(),
                    soong.iter().filter(|d| !allowed.contains(d)).collect(),
                    "[dependencies]",
                    "[dependencies] or [dev-dependencies]",
                );
                let sources = root.join(crate_root.parent().unwrap_or(Path::new("")));
                for (dev, ident) in &cargo.dev_idents {
                    if !soong.contains(dev)
                        && !cargo.normal.contains(dev)
                        && sources_use(&sources, ident)
                    {
                        problems.push(format!(
                            "{at}: the sources under {} use `{ident}` (a dev-dependency of {manifest}) but the test lacks `{dev}`",
                            crate_root.parent().unwrap_or(Path::new("")).display()
                        ));
                    }
                }
            } else {
                let expected: BTreeSet<String> = cargo.normal.clone();
                let extra: Vec<&String> = soong
                    .difference(&expected)
                    .filter(|d| !(module.kind.starts_with("rust_binary") && **d == cargo.own_lib))
                    .collect();
                report(
                    expected.difference(&soong).collect(),
                    extra,
                    "[dependencies]",
                    "[dependencies]",
                );
            }
        }
    }
    // Every workspace member is built by Soong or declared host-only.
    match read_toml(&root.join("Cargo.toml")) {
        Ok(workspace) => {
            let members = workspace
                .get("workspace")
                .and_then(|w| w.get("members"))
                .and_then(|m| m.as_array())
                .cloned()
                .unwrap_or_default();
            for member in members.iter().filter_map(|m| m.as_str()) {
                let has_modules = packages_with_modules.contains(Path::new(member));
                match (has_modules, external.host_only.contains_key(member)) {
                    (false, false) => problems.push(format!(
                        "workspace member `{member}` has no Soong module and is not listed under [host_only] in {EXTERNAL_MODULES}"
                    )),
                    (true, true) => problems.push(format!(
                        "workspace member `{member}` has Soong modules but is listed under [host_only] in {EXTERNAL_MODULES}"
                    )),
                    _ => {}
                }
            }
            for listed in external.host_only.keys() {
                if !members.iter().any(|m| m.as_str() == Some(listed)) {
                    problems.push(format!(
                        "{EXTERNAL_MODULES}: [host_only] `{listed}` is not a workspace member"
                    ));
                }
            }
        }
        Err(e) => problems.push(e),
    }
    problems
}

/// The text between `<tag>` and `</tag>` in each occurrence, in order.
fn xml_elements<'a>(text: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}"), format!("</{tag}>"));
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        // `<name>` must not match `<names>`: the tag ends at `>` or white space.
        if !after.starts_with(|c: char| c == '>' || c.is_whitespace()) {
            rest = after;
            continue;
        }
        let Some(body_start) = after.find('>') else { break };
        let body = &after[body_start + 1..];
        let Some(end) = body.find(&close) else { break };
        found.push(&body[..end]);
        rest = &body[end + close.len()..];
    }
    found
}

/// Each VINTF fragment a module installs declares AIDL HALs this tree defines: the
/// `aidl_interface` exists, the version is its newest frozen one, the interface file exists,
/// the instance `<name>.<fqname>` is the name the code serves (a string in a Rust source), and a
/// system module's fragment is a framework manifest.
pub fn vintf_problems(root: &Path, files: &[BpFile]) -> Vec<String> {
    let mut problems = Vec::new();
    let interfaces: BTreeMap<&str, (&BpFile, &Module)> = files
        .iter()
        .flat_map(|f| f.modules.iter().map(move |m| (f, m)))
        .filter(|(_, m)| m.kind == "aidl_interface")
        .filter_map(|(f, m)| Some((m.name()?, (f, m))))
        .collect();
    let rust_sources: Vec<String> = glob(root, "*/src/**/*.rs")
        .iter()
        .map(|p| fs::read_to_string(p).unwrap_or_default())
        .collect();
    for file in files {
        for module in &file.modules {
            let fragments =
                module.get("vintf_fragments").and_then(Value::as_strings).unwrap_or_default();
            for fragment in fragments.into_iter().filter(|f| !f.starts_with(':')) {
                let at = format!("{}: {fragment}", file.at(module));
                let Ok(text) = fs::read_to_string(root.join(file.dir()).join(fragment)) else {
                    continue; // missing_files reports it
                };
                let vendor = ["vendor", "soc_specific", "proprietary", "device_specific"]
                    .iter()
                    .any(|p| module.get(p) == Some(&Value::Bool(true)));
                let wanted = if vendor { "device" } else { "framework" };
                if !text.contains(&format!("type=\"{wanted}\"")) {
                    problems.push(format!(
                        "{at}: a {wanted} module needs <manifest type=\"{wanted}\">"
                    ));
                }
                let hals = xml_elements(&text, "hal");
                if hals.is_empty() {
                    problems.push(format!("{at}: declares no <hal>"));
                }
                for hal in hals {
                    let name = xml_elements(hal, "name").first().map(|s| s.trim()).unwrap_or("");
                    let version =
                        xml_elements(hal, "version").first().map(|s| s.trim()).unwrap_or("1");
                    let Some((aidl_file, aidl)) = interfaces.get(name) else {
                        problems
                            .push(format!("{at}: HAL `{name}` is no aidl_interface of this tree"));
                        continue;
                    };
                    let mut frozen: Vec<i64> = match aidl.get("versions_with_info") {
                        Some(Value::List(items)) => items
                            .iter()
                            .filter_map(|i| i.get("version")?.as_str()?.parse().ok())
                            .collect(),
                        _ => Vec::new(),
                    };
                    frozen.sort();
                    if frozen.last().map(|v| v.to_string()).as_deref() != Some(version) {
                        problems.push(format!(
                            "{at}: `{name}` version {version} is not the newest frozen version ({frozen:?})"
                        ));
                    }
                    let fqnames = xml_elements(hal, "fqname");
                    if fqnames.is_empty() {
                        problems.push(format!("{at}: `{name}` has no <fqname>"));
                    }
                    for fqname in fqnames {
                        let fqname = fqname.trim();
                        let Some((interface, _instance)) = fqname.split_once('/') else {
                            problems.push(format!(
                                "{at}: <fqname>{fqname}</fqname> is not Interface/instance"
                            ));
                            continue;
                        };
                        let aidl_path = root
                            .join(aidl_file.dir())
                            .join(name.replace('.', "/"))
                            .join(format!("{interface}.aidl"));
                        if !aidl_path.is_file() {
                            problems.push(format!("{at}: no {}", aidl_path.display()));
                        }
                        let served = format!("\"{name}.{fqname}\"");
                        if !rust_sources.iter().any(|s| s.contains(&served)) {
                            problems.push(format!("{at}: no Rust source serves {served}"));
                        }
                    }
                }
            }
        }
    }
    problems
}

/// Cargo variables Soong sets with `cargo_env_compat: true` (and none without it).
const SOONG_CARGO_VARIABLES: &[&str] = &[
    "CARGO_BIN_NAME",
    "CARGO_CRATE_NAME",
    "CARGO_PKG_NAME",
    "CARGO_PKG_VERSION",
    "CARGO_PKG_VERSION_MAJOR",
    "CARGO_PKG_VERSION_MINOR",
    "CARGO_PKG_VERSION_PATCH",
];

/// Sources a Rust module compiles must not read Cargo variables Soong does not set
/// (`env!("CARGO_MANIFEST_DIR")` fails to compile there). A library or binary skips test-only
/// files (`tests.rs`, `tests/`), which only its `rust_test` compiles.
pub fn cargo_env_problems(root: &Path, files: &[BpFile]) -> Vec<String> {
    let mut problems = Vec::new();
    for file in files {
        for module in &file.modules {
            if !module.kind.starts_with("rust_") || module.kind == "rust_defaults" {
                continue;
            }
            let Some(crate_root) = module.get("crate_root").and_then(Value::as_str) else {
                continue;
            };
            let compat = module.get("cargo_env_compat") == Some(&Value::Bool(true));
            let is_test = module.kind.starts_with("rust_test");
            let dir = root.join(file.dir()).join(crate_root);
            let dir = dir.parent().unwrap_or(root);
            for source in glob(dir, "**/*.rs") {
                let relative = source.strip_prefix(dir).unwrap_or(&source);
                let test_only = relative.file_name().is_some_and(|n| n == "tests.rs")
                    || relative.components().any(|c| c.as_os_str() == "tests");
                if test_only && !is_test {
                    continue;
                }
                let text = fs::read_to_string(&source).unwrap_or_default();
                for (i, _) in text.match_indices("env!(\"CARGO_") {
                    if text[..i].ends_with("option_") {
                        continue; // option_env! compiles without the variable
                    }
                    let name: String = text[i + 6..].chars().take_while(|c| *c != '"').collect();
                    if !(compat && SOONG_CARGO_VARIABLES.contains(&name.as_str())) {
                        problems.push(format!(
                            "{}: {} reads {name}, which Soong does not set{}",
                            file.at(module),
                            source.strip_prefix(root).unwrap_or(&source).display(),
                            if SOONG_CARGO_VARIABLES.contains(&name.as_str()) {
                                " without cargo_env_compat: true"
                            } else {
                                ""
                            }
                        ));
                    }
                }
            }
        }
    }
    problems
}

/// Runs the `genrule` `name` as Soong would, in a sandbox holding only its declared inputs:
/// its `srcs` (globs and `:filegroup` references expanded) are copied to `sandbox` at their
/// paths in the tree, `$(location x)`, `$(in)`, `$(out)`, `$(genDir)` and `$$` in `cmd` are
/// replaced (a tool's location comes from `tools`), and the command runs under `sh -c` from
/// `sandbox`. Returns the folder of its outputs; an output the command did not write is an
/// error.
pub fn run_genrule(
    root: &Path,
    files: &[BpFile],
    name: &str,
    tools: &BTreeMap<String, PathBuf>,
    sandbox: &Path,
) -> Result<PathBuf, String> {
    let find = |wanted: &str| {
        files
            .iter()
            .flat_map(|f| f.modules.iter().map(move |m| (f, m)))
            .find(|(_, m)| m.name() == Some(wanted))
    };
    let (file, module) = find(name).ok_or_else(|| format!("no module `{name}`"))?;
    if module.kind != "genrule" {
        return Err(format!("`{name}` is a {}, not a genrule", module.kind));
    }
    // (as written in srcs, paths relative to the tree's root)
    let mut inputs: Vec<(String, Vec<PathBuf>)> = Vec::new();
    for src in module.get("srcs").and_then(Value::as_strings).unwrap_or_default() {
        let (dir, patterns): (&Path, Vec<&str>) = match src.strip_prefix(':') {
            Some(group) => {
                let (group_file, group) =
                    find(group).ok_or_else(|| format!("`{name}`: no module `{group}`"))?;
                if group.kind != "filegroup" {
                    return Err(format!("`{name}`: `{src}` is not a filegroup"));
                }
                (
                    group_file.dir(),
                    group.get("srcs").and_then(Value::as_strings).unwrap_or_default(),
                )
            }
            None => (file.dir(), vec![src]),
        };
        let mut paths = Vec::new();
        for pattern in patterns {
            let found = if pattern.contains('*') {
                glob(&root.join(dir), pattern)
            } else {
                vec![root.join(dir).join(pattern)]
            };
            for path in found {
                let relative = path.strip_prefix(root).map_err(|e| e.to_string())?.to_path_buf();
                let target = sandbox.join(&relative);
                fs::create_dir_all(target.parent().unwrap_or(sandbox))
                    .map_err(|e| e.to_string())?;
                fs::copy(&path, &target)
                    .map_err(|e| format!("`{name}`: cannot copy {}: {e}", path.display()))?;
                paths.push(relative);
            }
        }
        inputs.push((src.to_owned(), paths));
    }
    let gen_dir = sandbox.join("__gen__");
    fs::create_dir_all(&gen_dir).map_err(|e| e.to_string())?;
    let outs: Vec<&str> = module.get("out").and_then(Value::as_strings).unwrap_or_default();
    let cmd = module.get("cmd").and_then(Value::as_str).ok_or(format!("`{name}` has no cmd"))?;
    let join = |paths: Vec<String>| paths.join(" ");
    let mut command = String::new();
    let mut rest = cmd;
    while let Some(at) = rest.find('$') {
        command.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            command.push('$');
            rest = after;
            continue;
        }
        let end = rest
            .find(')')
            .filter(|_| rest.starts_with("$("))
            .ok_or(format!("`{name}`: a `$` in cmd that is neither `$$` nor `$(...)`: {cmd}"))?;
        let variable = &rest[2..end];
        rest = &rest[end + 1..];
        let value = match variable.split_once(' ') {
            Some(("location", label)) => {
                match (tools.get(label), inputs.iter().find(|(s, _)| s == label)) {
                    (Some(tool), _) => tool.display().to_string(),
                    (None, Some((_, paths))) if paths.len() == 1 => paths[0].display().to_string(),
                    _ => {
                        return Err(format!(
                            "`{name}`: $(location {label}) names no tool or single input"
                        ))
                    }
                }
            }
            None if variable == "genDir" => gen_dir.display().to_string(),
            None if variable == "in" => {
                join(inputs.iter().flat_map(|(_, p)| p).map(|p| p.display().to_string()).collect())
            }
            None if variable == "out" => {
                join(outs.iter().map(|o| gen_dir.join(o).display().to_string()).collect())
            }
            _ => return Err(format!("`{name}`: unknown $({variable}) in cmd")),
        };
        command.push_str(&value);
    }
    command.push_str(rest);
    let output = crate::run(Command::new("sh").arg("-c").arg(&command).current_dir(sandbox));
    if !output.status.success() {
        return Err(format!(
            "`{name}`: `{command}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    for out in outs {
        if !gen_dir.join(out).is_file() {
            return Err(format!("`{name}`: the command did not write its output `{out}`"));
        }
    }
    Ok(gen_dir)
}

/// All of the checks above (not bpfmt), for one tree.
pub fn all_problems(root: &Path) -> Vec<String> {
    let files = match load(root) {
        Ok(files) => files,
        Err(problems) => return problems,
    };
    let external = match ExternalModules::load(root) {
        Ok(external) => external,
        Err(e) => return vec![e],
    };
    let mut problems = missing_files(root, &files);
    problems.extend(unknown_modules(root, &files, &external));
    problems.extend(cargo_mismatches(root, &files, &external));
    problems.extend(vintf_problems(root, &files));
    problems.extend(cargo_env_problems(root, &files));
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_names_and_folders() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("a/b")).unwrap();
        fs::write(dir.path().join("a/x.aidl"), "").unwrap();
        fs::write(dir.path().join("a/b/y.aidl"), "").unwrap();
        fs::write(dir.path().join("a/b/z.txt"), "").unwrap();
        assert_eq!(glob(dir.path(), "a/*.aidl").len(), 1);
        assert_eq!(glob(dir.path(), "a/**/*.aidl").len(), 2);
        assert_eq!(glob(dir.path(), "**/*.txt").len(), 1);
        assert!(glob(dir.path(), "a/*.rs").is_empty());
        assert!(glob(dir.path(), "nothing/**/*").is_empty());
    }

    #[test]
    fn strings_of_finds_nested_properties() {
        let file = blueprint::parse(
            r#"m { rustlibs: ["a"], target: { android: { rustlibs: ["b"] } }, x: [{ rustlibs: "c" }] }"#,
        )
        .unwrap();
        let mut out = Vec::new();
        strings_of(&file.modules[0].as_map(), &["rustlibs"], &mut out);
        let names: Vec<&str> = out.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }
}
