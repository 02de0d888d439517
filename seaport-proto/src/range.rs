//! npm-style version ranges (node-semver semantics, strict mode).
//!
//! Users of the tool we replace write npm ranges (`3.x`, `^1.2.3`,
//! `>=1.0.0 <2.0.0 || 3.2.2`, `1.2.3 - 2.3.4`), and npm reads them differently
//! from Cargo: a bare `3.2.2` is exact, and a prerelease version only satisfies
//! a range that names a prerelease of the same `major.minor.patch`. This module
//! follows node-semver's own pipeline step by step (hyphen ranges, operator
//! trimming, caret, tilde, x-range and star rewriting, then comparators) so that
//! its corner cases come out the same; `tests/conformance/semver` holds the
//! vectors it is tested against.
//!
//! Invariant: a [`VersionRange`] holds only comparators over valid versions; a
//! range npm rejects is an error here, never "matches nothing".

use std::cmp::Ordering;
use std::fmt;

use semver::{Prerelease, Version};

/// Longest version or range text node-semver accepts.
const MAX_LENGTH: usize = 256;
/// node-semver refuses numeric parts above `Number.MAX_SAFE_INTEGER`.
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Why a version or range was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RangeError {
    /// Not an exact `MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD]` version.
    #[error("invalid version {0:?}: expected MAJOR.MINOR.PATCH, e.g. 3.2.2")]
    Version(String),
    /// Not an npm range.
    #[error("invalid version range {0:?}: expected an npm range such as 3.x, ^3.2.0 or >=3.0.0 <4.0.0")]
    Range(String),
    /// Longer than npm accepts.
    #[error("version text longer than {MAX_LENGTH} characters")]
    TooLong,
}

/// Parses an exact version as npm does for registration: surrounding white
/// space and one leading `v` are dropped, and so is build metadata.
pub fn parse_version(text: &str) -> Result<Version, RangeError> {
    if text.len() > MAX_LENGTH {
        return Err(RangeError::TooLong);
    }
    full_plain(text.trim()).and_then(|p| p.to_version()).ok_or_else(|| RangeError::Version(text.to_owned()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Comparator {
    op: Op,
    /// `None` is node-semver's `ANY`: the empty comparator.
    version: Option<Version>,
}

impl Comparator {
    fn test(&self, v: &Version) -> bool {
        let Some(bound) = &self.version else { return true };
        let ord = precedence(v, bound);
        match self.op {
            Op::Eq => ord == Ordering::Equal,
            Op::Lt => ord == Ordering::Less,
            Op::Le => ord != Ordering::Greater,
            Op::Gt => ord == Ordering::Greater,
            Op::Ge => ord != Ordering::Less,
        }
    }
}

/// SemVer precedence: build metadata does not count (unlike `Version`'s `Ord`).
fn precedence(a: &Version, b: &Version) -> Ordering {
    (a.major, a.minor, a.patch).cmp(&(b.major, b.minor, b.patch)).then_with(|| a.pre.cmp(&b.pre))
}

/// A parsed npm range: alternatives (`||`) of comparator sets (all must hold).
#[derive(Clone, PartialEq, Eq)]
pub struct VersionRange {
    source: String,
    alternatives: Vec<Vec<Comparator>>,
}

impl VersionRange {
    /// Parses `text` with node-semver's strict rules.
    pub fn parse(text: &str) -> Result<VersionRange, RangeError> {
        if text.len() > MAX_LENGTH {
            return Err(RangeError::TooLong);
        }
        let invalid = || RangeError::Range(text.to_owned());
        let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let mut alternatives = Vec::new();
        for part in collapsed.split("||") {
            alternatives.push(comparator_set(part.trim()).ok_or_else(invalid)?);
        }
        Ok(VersionRange { source: text.trim().to_owned(), alternatives })
    }

    /// Whether `version` satisfies the range (npm's `satisfies`).
    pub fn matches(&self, version: &Version) -> bool {
        self.alternatives.iter().any(|set| set_matches(set, version))
    }

    /// The text the range was parsed from.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl fmt::Debug for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VersionRange({:?})", self.source)
    }
}

fn set_matches(set: &[Comparator], v: &Version) -> bool {
    if !set.iter().all(|c| c.test(v)) {
        return false;
    }
    if v.pre.is_empty() {
        return true;
    }
    // A prerelease satisfies only a set that names a prerelease of the same
    // major.minor.patch: `^1.2.3-beta` admits 1.2.3-rc but not 1.3.0-rc.
    set.iter()
        .filter_map(|c| c.version.as_ref())
        .any(|b| !b.pre.is_empty() && (b.major, b.minor, b.patch) == (v.major, v.minor, v.patch))
}

/// node-semver's `parseRange` for one `||` alternative.
fn comparator_set(part: &str) -> Option<Vec<Comparator>> {
    let part = hyphen_range(part).unwrap_or_else(|| part.to_owned());
    let part = trim_operators(&part);
    let part = part.replace("~> ", "~").replace("~ ", "~").replace("^ ", "^");
    let rewritten: Vec<String> = part.split(' ').map(rewrite_comparator).collect();
    let joined = rewritten.join(" ");
    let tokens: Vec<&str> =
        if joined.trim().is_empty() { vec![""] } else { joined.split_whitespace().collect() };
    tokens.into_iter().map(comparator).collect()
}

/// The pieces of an x-range: `[v=\s]*X(.X(.X(-PRE)?(+BUILD)?)?)?`.
#[derive(Debug, Clone, Copy)]
struct XRange<'a> {
    major: &'a str,
    minor: &'a str,
    patch: &'a str,
    pre: &'a str,
}

fn is_x(id: &str) -> bool {
    matches!(id, "" | "x" | "X" | "*")
}

fn numeric_id(s: &str) -> bool {
    s == "0" || (s.starts_with(|c: char| matches!(c, '1'..='9')) && s.bytes().all(|b| b.is_ascii_digit()))
}

fn x_id(s: &str) -> bool {
    numeric_id(s) || matches!(s, "x" | "X" | "*")
}

fn prerelease_id(s: &str) -> bool {
    numeric_id(s)
        || (!s.is_empty()
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && s.bytes().any(|b| !b.is_ascii_digit()))
}

fn build_id(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Splits `-PRE` and `+BUILD` off a version body, checking their identifiers.
fn split_suffixes(body: &str) -> Option<(&str, &str)> {
    let (body, build) = match body.split_once('+') {
        Some((b, build)) => (b, Some(build)),
        None => (body, None),
    };
    if let Some(build) = build
        && !build.split('.').all(build_id)
    {
        return None;
    }
    let (main, pre) = body.split_once('-').unwrap_or((body, ""));
    if body.contains('-') && !pre.split('.').all(prerelease_id) {
        return None;
    }
    Some((main, pre))
}

fn xrange_plain(text: &str) -> Option<XRange<'_>> {
    let body = text.trim_start_matches(['v', '=', ' ']);
    let (main, pre) = split_suffixes(body)?;
    let parts: Vec<&str> = main.split('.').collect();
    let has_suffix = main.len() != body.len();
    match parts.as_slice() {
        [major] if !has_suffix && x_id(major) => Some(XRange { major, minor: "", patch: "", pre }),
        [major, minor] if !has_suffix && x_id(major) && x_id(minor) => {
            Some(XRange { major, minor, patch: "", pre })
        }
        [major, minor, patch] if [major, minor, patch].iter().all(|p| x_id(p)) => {
            Some(XRange { major, minor, patch, pre })
        }
        _ => None,
    }
}

/// An exact version as node-semver's `FULLPLAIN` reads it.
#[derive(Debug, Clone, Copy)]
struct Plain<'a> {
    major: &'a str,
    minor: &'a str,
    patch: &'a str,
    pre: &'a str,
}

impl Plain<'_> {
    fn to_version(self) -> Option<Version> {
        let num = |s: &str| s.parse::<u64>().ok().filter(|n| *n <= MAX_SAFE_INTEGER);
        let mut v = Version::new(num(self.major)?, num(self.minor)?, num(self.patch)?);
        if !self.pre.is_empty() {
            v.pre = Prerelease::new(self.pre).ok()?;
        }
        Some(v)
    }
}

fn full_plain(text: &str) -> Option<Plain<'_>> {
    let body = text.strip_prefix('v').unwrap_or(text);
    let (main, pre) = split_suffixes(body)?;
    let mut parts = main.split('.');
    let (major, minor, patch) = (parts.next()?, parts.next()?, parts.next()?);
    let ok = parts.next().is_none() && [major, minor, patch].iter().all(|p| numeric_id(p));
    ok.then_some(Plain { major, minor, patch, pre })
}

/// The ways node's greedy `((?:<|>)?=?)\s*` can split an operator off, in the
/// order its backtracking tries them.
fn operator_splits(token: &str) -> impl Iterator<Item = (&str, &str)> {
    ["<=", "<", ">=", ">", "=", ""].into_iter().filter_map(move |op| {
        let rest = token.strip_prefix(op)?;
        Some((op, rest.strip_prefix(' ').unwrap_or(rest)))
    })
}

/// `X + 1` on a decimal string, as JavaScript's `+X + 1` for safe integers.
fn plus_one(id: &str) -> String {
    match id.parse::<u64>() {
        Ok(n) => n.saturating_add(1).to_string(),
        // Beyond u64 the result is refused later anyway, as node refuses it.
        Err(_) => format!("{id}1"),
    }
}

/// `A - B` → `>=A <=B`, with x-ranges widened (node-semver's `hyphenReplace`).
fn hyphen_range(part: &str) -> Option<String> {
    let (from_text, to_text) = part.split_once(" - ")?;
    let (from, to) = (xrange_plain(from_text)?, xrange_plain(to_text)?);
    let from = if is_x(from.major) {
        String::new()
    } else if is_x(from.minor) {
        format!(">={}.0.0", from.major)
    } else if is_x(from.patch) {
        format!(">={}.{}.0", from.major, from.minor)
    } else {
        format!(">={from_text}")
    };
    let to = if is_x(to.major) {
        String::new()
    } else if is_x(to.minor) {
        format!("<{}.0.0-0", plus_one(to.major))
    } else if is_x(to.patch) {
        format!("<{}.{}.0-0", to.major, plus_one(to.minor))
    } else if !to.pre.is_empty() {
        format!("<={}.{}.{}-{}", to.major, to.minor, to.patch, to.pre)
    } else {
        format!("<={to_text}")
    };
    Some(format!("{from} {to}").trim().to_owned())
}

/// Removes the space between an operator and its version (`>= 1.2.3` → `>=1.2.3`).
fn trim_operators(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    let mut rest = part;
    while let Some(c) = rest.chars().next() {
        rest = &rest[c.len_utf8()..];
        out.push(c);
        let is_op = matches!(c, '<' | '>' | '=');
        if is_op && !rest.starts_with('=') && rest.starts_with(' ') {
            let after = rest.trim_start_matches(['v', '=', ' ']);
            if after.starts_with(|c: char| c.is_ascii_digit() || matches!(c, 'x' | 'X' | '*')) {
                rest = rest.trim_start_matches(' ');
            }
        }
    }
    out
}

/// node-semver's `parseComparator`: caret, tilde, x-range and star rewriting.
fn rewrite_comparator(token: &str) -> String {
    let s: Vec<String> = token.split_whitespace().map(caret).collect();
    let s: Vec<String> = s.join(" ").split_whitespace().map(tilde).collect();
    let s: Vec<String> = s.join(" ").split_whitespace().map(xrange).collect();
    strip_first_star(s.join(" ").trim())
}

fn caret(token: &str) -> String {
    let Some(r) = token.strip_prefix('^').and_then(xrange_plain) else {
        return token.to_owned();
    };
    let (ma, mi, pa) = (r.major, r.minor, r.patch);
    let pre = if r.pre.is_empty() { String::new() } else { format!("-{}", r.pre) };
    if is_x(ma) {
        String::new()
    } else if is_x(mi) {
        format!(">={ma}.0.0 <{}.0.0-0", plus_one(ma))
    } else if is_x(pa) {
        if ma == "0" {
            format!(">={ma}.{mi}.0 <{ma}.{}.0-0", plus_one(mi))
        } else {
            format!(">={ma}.{mi}.0 <{}.0.0-0", plus_one(ma))
        }
    } else if ma == "0" {
        if mi == "0" {
            format!(">={ma}.{mi}.{pa}{pre} <{ma}.{mi}.{}-0", plus_one(pa))
        } else {
            format!(">={ma}.{mi}.{pa}{pre} <{ma}.{}.0-0", plus_one(mi))
        }
    } else {
        format!(">={ma}.{mi}.{pa}{pre} <{}.0.0-0", plus_one(ma))
    }
}

fn tilde(token: &str) -> String {
    let Some(rest) = token.strip_prefix('~') else { return token.to_owned() };
    let rest = rest.strip_prefix('>').unwrap_or(rest);
    let Some(r) = xrange_plain(rest) else { return token.to_owned() };
    let (ma, mi, pa) = (r.major, r.minor, r.patch);
    if is_x(ma) {
        String::new()
    } else if is_x(mi) {
        format!(">={ma}.0.0 <{}.0.0-0", plus_one(ma))
    } else if is_x(pa) {
        format!(">={ma}.{mi}.0 <{ma}.{}.0-0", plus_one(mi))
    } else if !r.pre.is_empty() {
        format!(">={ma}.{mi}.{pa}-{} <{ma}.{}.0-0", r.pre, plus_one(mi))
    } else {
        format!(">={ma}.{mi}.{pa} <{ma}.{}.0-0", plus_one(mi))
    }
}

fn xrange(token: &str) -> String {
    let Some((op, r)) = operator_splits(token).find_map(|(op, rest)| Some((op, xrange_plain(rest)?))) else {
        return token.to_owned();
    };
    let (x_major, x_minor) = (is_x(r.major), is_x(r.major) || is_x(r.minor));
    let any_x = x_minor || is_x(r.patch);
    let op = if op == "=" && any_x { "" } else { op };
    if x_major {
        return if op == ">" || op == "<" { "<0.0.0-0".into() } else { "*".into() };
    }
    if !op.is_empty() && any_x {
        let (mut ma, mut mi, mut op) = (r.major.to_owned(), r.minor.to_owned(), op);
        if x_minor {
            mi = "0".into();
        }
        if op == ">" {
            op = ">=";
            if x_minor {
                ma = plus_one(&ma);
            } else {
                mi = plus_one(&mi);
            }
        } else if op == "<=" {
            op = "<";
            if x_minor {
                ma = plus_one(&ma);
            } else {
                mi = plus_one(&mi);
            }
        }
        let pre = if op == "<" { "-0" } else { "" };
        return format!("{op}{ma}.{mi}.0{pre}");
    }
    if x_minor {
        format!(">={}.0.0 <{}.0.0-0", r.major, plus_one(r.major))
    } else if any_x {
        format!(">={}.{}.0 <{}.{}.0-0", r.major, r.minor, r.major, plus_one(r.minor))
    } else {
        token.to_owned()
    }
}

/// node-semver's unanchored `(<|>)?=?\s*\*` replaced once by nothing.
fn strip_first_star(s: &str) -> String {
    let Some(star) = s.find('*') else { return s.to_owned() };
    let prefix_ok = |p: &str| {
        let p = p.strip_prefix(['<', '>']).unwrap_or(p);
        let p = p.strip_prefix('=').unwrap_or(p);
        p.is_empty() || p == " "
    };
    let start = (star.saturating_sub(3)..=star)
        .find(|&i| s.is_char_boundary(i) && prefix_ok(&s[i..star]))
        .unwrap_or(star);
    format!("{}{}", &s[..start], &s[star + 1..])
}

/// node-semver's `Comparator`: `^((?:<|>)?=?)\s*(FULLPLAIN)$|^$`.
fn comparator(token: &str) -> Option<Comparator> {
    if token.is_empty() {
        return Some(Comparator { op: Op::Eq, version: None });
    }
    let (op, plain) = operator_splits(token).find_map(|(op, rest)| Some((op, full_plain(rest)?)))?;
    let op = match op {
        "<=" => Op::Le,
        "<" => Op::Lt,
        ">=" => Op::Ge,
        ">" => Op::Gt,
        _ => Op::Eq,
    };
    Some(Comparator { op, version: Some(plain.to_version()?) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sat(range: &str, version: &str) -> bool {
        VersionRange::parse(range).unwrap().matches(&parse_version(version).unwrap())
    }

    #[test]
    fn npm_not_cargo() {
        assert!(sat("3.2.2", "3.2.2"));
        assert!(!sat("3.2.2", "3.2.3"));
        assert!(sat("3.x", "3.9.0"));
        assert!(!sat("3.x", "4.0.0"));
        assert!(sat(">=3.0.0 <4.0.0", "3.5.1"));
        assert!(sat("1.2.3 - 2.3.4", "2.3.4"));
        assert!(sat("1.x || >=2.5.0", "2.6.0"));
        assert!(!sat("*", "1.0.0-beta"));
        assert!(sat("^1.2.3-beta.1", "1.2.3-beta.2"));
        assert!(!sat("^1.2.3-beta.1", "1.2.4-beta.2"));
        assert!(sat(">= 1.2.3", "1.2.4"));
        assert!(sat("~> 1.2", "1.2.9"));
    }

    #[test]
    fn refused_ranges_are_errors() {
        for bad in ["latest-ish", "1.2.3.4", "^1.2.3 garbage", ">=", "a.b.c"] {
            assert!(VersionRange::parse(bad).is_err(), "{bad}");
        }
        let long = "1".repeat(300);
        assert_eq!(VersionRange::parse(&long), Err(RangeError::TooLong));
    }
}
