//! `--config FILE`: every binary's flags from a TOML file, for systemd units
//! and for proxies serving many roles.
//!
//! A setting is a long flag without its dashes (`drain = "30s"`,
//! `max-streams = 4096`; `_` works as `-`), a positional argument by its
//! name (`registry = "KEY@host:port"`), a switch by `true`, a repeatable
//! flag by an array (`allow = ["…", "…"]`). A proxy's roles are `[[map]]`
//! tables (`role`, `port`, and `protocol = "udp"` for a UDP port). The file
//! becomes arguments placed before the command line's, so clap checks them
//! as it checks flags.
//!
//! Invariants: a flag given on the command line (or its environment
//! variable) overrides the file's setting of it, repeatable ones included
//! (the file's list is then not used at all); an unknown key, a value of
//! the wrong kind or a TOML error is a usage error naming the file and the
//! key or line, never ignored.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, Command};

/// The `--config FILE` of `argv`, looked for before clap parses (the file
/// supplies what clap then checks).
pub fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    argv.iter().enumerate().skip(1).find_map(|(i, arg)| {
        let arg = arg.to_str()?;
        match arg.strip_prefix("--config") {
            Some("") => argv.get(i + 1).map(PathBuf::from),
            Some(rest) => rest.strip_prefix('=').map(PathBuf::from),
            None => None,
        }
    })
}

/// `argv` with the settings of the file `path` (read now) put before its
/// own arguments, except those the command line or the environment sets.
pub fn with_file(cmd: &Command, path: &Path, argv: &[OsString]) -> Result<Vec<OsString>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    expand(cmd, &text, argv).map_err(|e| format!("{}: {e}", path.display()))
}

/// [`with_file`] of a file's `text`.
pub fn expand(cmd: &Command, text: &str, argv: &[OsString]) -> Result<Vec<OsString>, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
    // What the user set where it wins over the file.
    let given = cmd.clone().ignore_errors(true).try_get_matches_from(argv).ok();
    let overridden = |id: &str| {
        given
            .as_ref()
            .and_then(|m| m.value_source(id))
            .is_some_and(|s| matches!(s, ValueSource::CommandLine | ValueSource::EnvVariable))
    };
    let mut positionals = Vec::new();
    let mut flags = Vec::new();
    for (key, value) in table {
        let name = key.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .find(|a| match a.get_long() {
                Some(long) => long == name,
                None => a.is_positional() && a.get_id().as_str().replace('_', "-") == name,
            })
            .ok_or_else(|| {
                let known: Vec<String> = cmd
                    .get_arguments()
                    .filter_map(|a| a.get_long().map(str::to_owned).or_else(|| Some(a.get_id().to_string())))
                    .filter(|n| !matches!(n.as_str(), "help" | "version" | "config" | "completions"))
                    .collect();
                format!("unknown setting `{key}`; the settings are: {}", known.join(", "))
            })?;
        if matches!(name.as_str(), "config" | "completions" | "help" | "version") {
            return Err(format!("`{key}` cannot be set in a config file"));
        }
        if overridden(arg.get_id().as_str()) {
            continue;
        }
        let switch = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::Count);
        if switch {
            match value {
                toml::Value::Boolean(true) => flags.push(OsString::from(format!("--{name}"))),
                toml::Value::Boolean(false) => {}
                other => return Err(format!("`{key}` is a switch: true or false, not {}", other.type_str())),
            }
            continue;
        }
        let repeatable = matches!(arg.get_action(), ArgAction::Append);
        let values = match value {
            toml::Value::Array(items) if repeatable => items,
            toml::Value::Array(_) => return Err(format!("`{key}` takes one value, not a list")),
            one => vec![one],
        };
        for value in values {
            let text = scalar(&key, value)?;
            match arg.get_long() {
                Some(_) => flags.push(OsString::from(format!("--{name}={text}"))),
                None => positionals.push(OsString::from(text)),
            }
        }
    }
    let mut out: Vec<OsString> = argv.iter().take(1).cloned().collect();
    out.extend(positionals);
    out.extend(flags);
    out.extend(argv.iter().skip(1).cloned());
    Ok(out)
}

/// One value as its flag would be written; a `[[map]]` table as
/// `ROLE=PORT[/PROTOCOL]`.
fn scalar(key: &str, value: toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s),
        toml::Value::Integer(n) => Ok(n.to_string()),
        toml::Value::Float(n) => Ok(n.to_string()),
        toml::Value::Table(table) if key == "map" => {
            let field = |name: &str| table.get(name).map(|v| scalar(name, v.clone())).transpose();
            let (Some(role), Some(port)) = (field("role")?, field("port")?) else {
                return Err("a [[map]] needs `role` and `port` (and `protocol = \"udp\"` for UDP)".into());
            };
            if let Some(extra) = table.keys().find(|k| !matches!(k.as_str(), "role" | "port" | "protocol")) {
                return Err(format!("a [[map]] has no `{extra}`: role, port and protocol"));
            }
            Ok(match field("protocol")? {
                Some(protocol) => format!("{role}={port}/{protocol}"),
                None => format!("{role}={port}"),
            })
        }
        other => Err(format!("`{key}` cannot be {}", other.type_str())),
    }
}

/// Parses `A` from the process's arguments, with `--config FILE` applied;
/// a bad file ends the process as a usage error does.
pub fn parse<A: clap::Parser>() -> A {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let Some(path) = config_path(&argv) else { return A::parse_from(argv) };
    match with_file(&A::command(), &path, &argv) {
        Ok(argv) => A::parse_from(argv),
        Err(e) => A::command().error(clap::error::ErrorKind::ValueValidation, e).exit(),
    }
}

/// Rereads the file at `path` (on SIGHUP) into `A` as [`parse`] would at
/// start; on an error the caller keeps what is in force.
pub fn reread<A: clap::Parser>(path: &Path) -> Result<A, String> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let argv = with_file(&A::command(), path, &argv)?;
    A::try_parse_from(argv).map_err(|e| e.to_string().trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Args {
        target: String,
        #[arg(long)]
        drain: Option<String>,
        #[arg(long)]
        max_streams: Option<u32>,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        allow: Vec<String>,
        #[arg(long)]
        map: Vec<String>,
        #[arg(long)]
        config: Option<PathBuf>,
    }

    fn argv(args: &[&str]) -> Vec<OsString> {
        std::iter::once("bin").chain(args.iter().copied()).map(OsString::from).collect()
    }

    fn parsed(text: &str, args: &[&str]) -> Result<Args, String> {
        let argv = expand(&Args::command(), text, &argv(args))?;
        Args::try_parse_from(argv).map_err(|e| e.to_string())
    }

    #[test]
    fn every_kind_of_setting_reads_as_its_flag() {
        let text = r#"
            target = "KEY@127.0.0.1:4500"
            drain = "30s"
            max_streams = 64
            json = true
            allow = ["a", "b"]
            [[map]]
            role = "web@1"
            port = 8080
            [[map]]
            role = "dns@1"
            port = 5353
            protocol = "udp"
        "#;
        let args = parsed(text, &["--config", "f"]).unwrap();
        assert_eq!(args.target, "KEY@127.0.0.1:4500");
        assert_eq!(args.drain.as_deref(), Some("30s"));
        assert_eq!(args.max_streams, Some(64));
        assert!(args.json);
        assert_eq!(args.allow, ["a", "b"]);
        assert_eq!(args.map, ["web@1=8080", "dns@1=5353/udp"]);
    }

    #[test]
    fn the_command_line_overrides_the_file_lists_included() {
        let text = "target = \"T\"\ndrain = \"30s\"\nallow = [\"a\", \"b\"]\nmax-streams = 5";
        let args = parsed(text, &["OTHER", "--drain", "1s", "--allow", "c"]).unwrap();
        assert_eq!((args.target.as_str(), args.drain.as_deref()), ("OTHER", Some("1s")));
        assert_eq!(args.allow, ["c"], "the file's list is replaced, not extended");
        assert_eq!(args.max_streams, Some(5), "what the command line leaves is the file's");
    }

    #[test]
    fn mistakes_name_the_key_or_the_line() {
        let unknown = parsed("target = \"T\"\ndrian = \"1s\"", &[]).unwrap_err();
        assert!(unknown.contains("unknown setting `drian`") && unknown.contains("drain"), "{unknown}");
        let switch = parsed("target = \"T\"\njson = \"yes\"", &[]).unwrap_err();
        assert!(switch.contains("`json` is a switch"), "{switch}");
        let list = parsed("target = \"T\"\ndrain = [\"1s\"]", &[]).unwrap_err();
        assert!(list.contains("takes one value"), "{list}");
        let syntax = parsed("target = \"T\"\ndrain = ", &[]).unwrap_err();
        assert!(syntax.contains("line 2"), "{syntax}");
        let map = parsed("target = \"T\"\n[[map]]\nrole = \"web@1\"", &[]).unwrap_err();
        assert!(map.contains("needs `role` and `port`"), "{map}");
        let nested = parsed("target = \"T\"\nconfig = \"x\"", &[]).unwrap_err();
        assert!(nested.contains("cannot be set in a config file"), "{nested}");
    }

    #[test]
    fn the_path_is_found_in_either_form() {
        assert_eq!(config_path(&argv(&["x", "--config", "a.toml"])), Some(PathBuf::from("a.toml")));
        assert_eq!(config_path(&argv(&["--config=b.toml"])), Some(PathBuf::from("b.toml")));
        assert_eq!(config_path(&argv(&["--configure"])), None);
    }
}
