//! Every npm range-matching vector in `tests/conformance/semver` must pass.
//!
//! The vectors were produced by node-semver itself (their README says how);
//! they are the oracle for `seaport_proto::range`. They live in the repository
//! so a clone alone passes its tests; `SEAPORT_CONFORMANCE_DIR` points the
//! test at another copy (a newer set of vectors, say). A missing file fails.

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::PathBuf;

use seaport_proto::range::{VersionRange, parse_version};
use seaport_proto::role::{Role, RoleQuery};
use serde_json::Value;

fn vectors_dir() -> PathBuf {
    match std::env::var_os("SEAPORT_CONFORMANCE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/semver"),
    }
}

fn lines(file: &str) -> Vec<Value> {
    let path = vectors_dir().join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e} (set SEAPORT_CONFORMANCE_DIR)", path.display()));
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn check_ranges(file: &str) {
    let mut failures = Vec::new();
    let vectors = lines(file);
    assert!(!vectors.is_empty(), "{file} has no vectors");
    for v in &vectors {
        let range = v["range"].as_str().unwrap();
        let valid = v["valid"].as_bool().unwrap();
        let parsed = VersionRange::parse(range);
        if parsed.is_ok() != valid {
            failures.push(format!("{range:?}: valid should be {valid}, got {parsed:?}"));
            continue;
        }
        // The same range through the public role API.
        let query = RoleQuery::parse(&format!("db@{range}"));
        assert_eq!(query.is_ok(), valid, "RoleQuery db@{range}");
        let Ok(parsed) = parsed else { continue };
        for case in v["cases"].as_array().unwrap() {
            let version = case[0].as_str().unwrap();
            let expected = case[1].as_bool().unwrap();
            let got = parse_version(version).is_ok_and(|ver| parsed.matches(&ver));
            if got != expected {
                failures.push(format!("{range:?} vs {version}: expected {expected}, got {got}"));
            }
            if let (Ok(query), Ok(role)) = (&query, Role::parse(&format!("db@{version}"))) {
                assert_eq!(query.matches(&role), got, "RoleQuery::matches for {range} / {version}");
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} lines fail in {file}:\n{}",
        failures.len(),
        vectors.len(),
        failures.join("\n")
    );
}

#[test]
fn curated_ranges() {
    check_ranges("curated.jsonl");
}

#[test]
fn public_ranges() {
    check_ranges("public.jsonl");
}

#[test]
fn registration_versions() {
    let vectors = lines("versions.jsonl");
    // Both kinds must be there, or a file that lost its lines passes.
    let valid = vectors.iter().filter(|v| v["valid"].as_bool() == Some(true)).count();
    assert!(
        valid > 0 && valid < vectors.len(),
        "versions.jsonl needs valid and invalid vectors: {valid} of {}",
        vectors.len()
    );
    for v in vectors {
        let text = v["version"].as_str().unwrap();
        let parsed = parse_version(text);
        assert_eq!(parsed.is_ok(), v["valid"].as_bool().unwrap(), "{text:?}: {parsed:?}");
        if let (Ok(ver), Some(normalized)) = (parsed, v["normalized"].as_str()) {
            assert_eq!(ver.to_string(), normalized, "{text:?}");
        }
    }
}
