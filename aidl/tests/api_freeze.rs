//! Keeps the stable AIDL API from changing silently.
//!
//! Layout (as Soong's `aidl_interface`): the sources live in `android/system/checkpoint/`, the
//! API dump of the sources in `aidl_api/android.system.checkpoint/current/`, and every frozen
//! version `N` in `aidl_api/android.system.checkpoint/N/` with its `.hash`.
//!
//! A dump file is the source file with comments and blank lines removed, each line's trailing
//! white space trimmed, behind a fixed header: doc comments may change, declarations may not.
//!
//! The `.hash` of version N is computed as AOSP's `system/tools/aidl/build/hash_gen.sh` does:
//! inside the version directory, `find ./ -name "*.aidl" -print0 | LC_ALL=C sort -z | xargs -0
//! sha1sum`, followed by one line holding the previous version number (`N-1`), or the literal
//! `latest-version` for version 1 (Soong's `versionForHashGen`); the SHA-1 of all that text, in
//! lowercase hex, is the hash.
//!
//! To change the API: edit the sources, run this test with `CHECKPOINT_AIDL_UPDATE_API=1` to
//! rewrite `current/`, then with `CHECKPOINT_AIDL_FREEZE_API=1` to freeze `current/` as the next
//! version. The build stamps the interfaces with the newest frozen version and its hash.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use sha1::{Digest, Sha1};

const HEADER: &str =
    "///////////////////////////////////////////////////////////////////////////////
// THIS FILE IS IMMUTABLE. DO NOT EDIT IN ANY CASE.                          //
///////////////////////////////////////////////////////////////////////////////
// This file is an API dump of android.system.checkpoint (see aidl/tests/api_freeze.rs).
";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn api_dir() -> PathBuf {
    root().join("aidl_api/android.system.checkpoint")
}

/// Removes `//` and `/* */` comments (none of our sources has these inside strings).
fn strip_comments(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut chars = source.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('/', Some('/')) => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            ('/', Some('*')) => {
                chars.next();
                let mut prev = ' ';
                for c in chars.by_ref() {
                    if prev == '*' && c == '/' {
                        break;
                    }
                    prev = c;
                }
            }
            _ => out.push(c),
        }
    }
    out
}

fn dump_of(source: &str) -> String {
    let mut out = String::from(HEADER);
    for line in strip_comments(source).lines() {
        let line = line.trim_end();
        if !line.trim().is_empty() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Relative path ("android/system/checkpoint/X.aidl") → contents, for every .aidl under `dir`.
fn aidl_files(dir: &Path) -> BTreeMap<String, String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(entries) = fs::read_dir(dir) else { return };
        for entry in entries {
            let path = entry.expect("readable directory entry").path();
            if path.is_dir() {
                walk(base, &path, out);
            } else if path.extension().is_some_and(|e| e == "aidl") {
                let rel = path.strip_prefix(base).expect("under base").to_string_lossy();
                let text = fs::read_to_string(&path).expect("readable .aidl file");
                out.insert(rel.into_owned(), text);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn source_dump() -> BTreeMap<String, String> {
    aidl_files(&root().join("android/system/checkpoint"))
        .into_iter()
        .map(|(rel, text)| (format!("android/system/checkpoint/{rel}"), dump_of(&text)))
        .collect()
}

fn frozen_versions() -> Vec<u32> {
    let mut versions: Vec<u32> = fs::read_dir(api_dir())
        .expect("aidl_api/android.system.checkpoint exists")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort_unstable();
    versions
}

fn version_for_hash_gen(version: u32) -> String {
    if version > 1 {
        (version - 1).to_string()
    } else {
        "latest-version".to_owned()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hash_gen.sh computation over a version directory's files.
fn api_hash(files: &BTreeMap<String, String>, version: u32) -> String {
    // `find ./` names files "./<rel>"; LC_ALL=C sort orders them bytewise, as BTreeMap does
    // (the common "./" prefix does not change the order).
    let mut listing = String::new();
    for (rel, text) in files {
        listing.push_str(&format!("{}  ./{rel}\n", hex(&Sha1::digest(text.as_bytes()))));
    }
    listing.push_str(&version_for_hash_gen(version));
    listing.push('\n');
    hex(&Sha1::digest(listing.as_bytes()))
}

fn write_dump(dir: &Path, files: &BTreeMap<String, String>) {
    if dir.exists() {
        fs::remove_dir_all(dir).expect("remove the old dump");
    }
    for (rel, text) in files {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().expect("has a parent")).expect("create dump dirs");
        fs::write(&path, text).expect("write dump file");
    }
}

fn describe_difference(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> String {
    let mut out = Vec::new();
    for (rel, text) in a {
        match b.get(rel) {
            None => out.push(format!("{rel}: only in the first")),
            Some(other) if other != text => out.push(format!("{rel}: differs")),
            Some(_) => {}
        }
    }
    out.extend(
        b.keys().filter(|rel| !a.contains_key(*rel)).map(|r| format!("{r}: only in the second")),
    );
    out.join("\n")
}

#[test]
fn current_dump_matches_the_sources() {
    let current_dir = api_dir().join("current");
    let sources = source_dump();
    if std::env::var_os("CHECKPOINT_AIDL_UPDATE_API").is_some() {
        write_dump(&current_dir, &sources);
    }
    let current = aidl_files(&current_dir);
    assert!(
        current == sources,
        "aidl_api/android.system.checkpoint/current/ is not the dump of the sources:\n{}\n\
         Run `CHECKPOINT_AIDL_UPDATE_API=1 cargo test -p checkpoint-aidl --test api_freeze` to \
         update it, then freeze a new version.",
        describe_difference(&sources, &current)
    );
}

#[test]
fn newest_frozen_version_is_current() {
    let current = aidl_files(&api_dir().join("current"));
    let versions = frozen_versions();
    let newest = versions.last().copied();
    let newest_files = newest.map(|v| aidl_files(&api_dir().join(v.to_string())));
    if std::env::var_os("CHECKPOINT_AIDL_FREEZE_API").is_some()
        && newest_files.as_ref() != Some(&current)
    {
        let next = newest.map_or(1, |v| v + 1);
        let dir = api_dir().join(next.to_string());
        write_dump(&dir, &current);
        fs::write(dir.join(".hash"), format!("{}\n", api_hash(&current, next)))
            .expect("write .hash");
        return;
    }
    let newest = newest.expect("at least one frozen version");
    assert!(
        newest_files.as_ref() == Some(&current),
        "the API in current/ differs from the newest frozen version {newest}:\n{}\n\
         A stable interface can't change silently: freeze the change as version {} with \
         `CHECKPOINT_AIDL_FREEZE_API=1 cargo test -p checkpoint-aidl --test api_freeze`.",
        describe_difference(newest_files.as_ref().expect("checked"), &current),
        newest + 1
    );
}

#[test]
fn every_frozen_version_has_a_matching_hash() {
    for version in frozen_versions() {
        let dir = api_dir().join(version.to_string());
        let recorded = fs::read_to_string(dir.join(".hash"))
            .unwrap_or_else(|e| panic!("version {version} has no .hash: {e}"));
        let recorded = recorded.lines().last().unwrap_or("").trim();
        let computed = api_hash(&aidl_files(&dir), version);
        assert_eq!(recorded, computed, "frozen version {version} was edited after freezing");
    }
}

#[test]
fn frozen_versions_only_add_declarations() {
    // A later version keeps every line of the earlier one (methods, fields and constants are
    // only ever added), the rule AOSP's API checker enforces for stable interfaces.
    let versions = frozen_versions();
    for pair in versions.windows(2) {
        let old = aidl_files(&api_dir().join(pair[0].to_string()));
        let new = aidl_files(&api_dir().join(pair[1].to_string()));
        for (rel, text) in &old {
            let newer = new.get(rel).unwrap_or_else(|| panic!("{rel} removed in {}", pair[1]));
            for line in text.lines() {
                assert!(newer.lines().any(|l| l == line), "{rel}: `{line}` changed in {}", pair[1]);
            }
        }
    }
}

/// Whether a field line (`type name [= value];`, annotations first) gives the field a useful
/// default, as AOSP's API checker requires of a field added to an existing parcelable
/// (`aidl_checkapi.cpp`: a default value, `@nullable`, a primitive type, or an enum with a 0
/// enumerator), so that a parcel from an older version reads with a meaningful value.
fn has_useful_default(field: &str, files: &BTreeMap<String, String>) -> bool {
    let field = field.trim();
    if field.contains('=') || field.contains("@nullable") {
        return true;
    }
    let words: Vec<&str> = field.split_whitespace().filter(|w| !w.starts_with('@')).collect();
    let Some(ty) = words.first() else { return false };
    if ["boolean", "byte", "char", "int", "long", "float", "double"].contains(ty) {
        return true;
    }
    // An enum of this package with a 0 enumerator.
    files.iter().any(|(rel, text)| {
        rel.ends_with(&format!("/{ty}.aidl"))
            && text.contains(&format!("enum {ty}"))
            && text.lines().any(|l| l.trim_end_matches(',').trim().ends_with("= 0"))
    })
}

#[test]
fn fields_added_to_a_frozen_parcelable_have_a_useful_default() {
    let versions = frozen_versions();
    for pair in versions.windows(2) {
        let old = aidl_files(&api_dir().join(pair[0].to_string()));
        let new = aidl_files(&api_dir().join(pair[1].to_string()));
        for (rel, text) in &old {
            if !text.contains("parcelable ") {
                continue;
            }
            let newer = &new[rel];
            for line in newer.lines().filter(|l| !text.lines().any(|o| o == *l)) {
                let field = line.trim();
                let declaration =
                    ["import ", "package ", "const "].iter().all(|k| !field.starts_with(k));
                if field.ends_with(';') && !field.contains('(') && declaration {
                    assert!(
                        has_useful_default(field, &new),
                        "{rel} version {}: `{field}` has no useful default (give it one or mark \
                         it @nullable, as AOSP's API checker requires)",
                        pair[1]
                    );
                }
            }
        }
    }
}

#[test]
fn the_useful_default_rule_refuses_what_aosp_refuses() {
    let files = BTreeMap::from([
        ("p/E.aidl".to_owned(), "enum E {\n    A = 0,\n}\n".to_owned()),
        ("p/F.aidl".to_owned(), "enum F {\n    A = 1,\n}\n".to_owned()),
    ]);
    for ok in ["long x;", "long x = -1;", "@nullable P p;", "P[] list = {};", "E e;", "boolean b;"]
    {
        assert!(has_useful_default(ok, &files), "{ok}");
    }
    for bad in ["P[] list;", "@utf8InCpp String s;", "P p;", "F f;"] {
        assert!(!has_useful_default(bad, &files), "{bad}");
    }
}

#[test]
fn hash_matches_aosp_hash_gen_known_answer() {
    // Known answer from running hash_gen.sh's pipeline on a directory holding `a.aidl` ("x\n")
    // and `b/c.aidl` ("y\n") with `latest-version` (version 1).
    let files = BTreeMap::from([
        ("a.aidl".to_owned(), "x\n".to_owned()),
        ("b/c.aidl".to_owned(), "y\n".to_owned()),
    ]);
    assert_eq!(api_hash(&files, 1), "8d0dc9b74d3c5289f4cfaabd66b7f24259f073d6");
}

#[test]
fn generated_code_carries_the_frozen_version_and_hash() {
    let newest = *frozen_versions().last().expect("a frozen version");
    let hash = fs::read_to_string(api_dir().join(newest.to_string()).join(".hash"))
        .expect("the newest version has a .hash");
    use checkpoint_aidl::android::system::checkpoint::ICheckpoint;
    assert_eq!(i64::from(ICheckpoint::VERSION), i64::from(newest));
    assert_eq!(ICheckpoint::HASH, hash.trim());
}
