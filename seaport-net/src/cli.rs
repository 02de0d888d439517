//! What every binary's `main` shares: logging to stderr, argument parsers
//! for durations and address lists, and the one-line fatal exit.
//!
//! Exit codes are part of the command-line contract: 0 after a clean
//! shutdown, 1 on a fatal runtime error, 2 on a usage error. Every usage
//! error, whether clap finds it or `run` does later (a seed file that does
//! not parse, say), is printed in clap's one form: `error: ...`, the usage
//! line, and a pointer to `--help`.
//!
//! Values that cannot work (a zero interval, a zero port to connect to, a
//! negative duration) are refused at parse time with the allowed range,
//! never accepted and then misbehaving.

use std::path::PathBuf;
use std::time::Duration;

use seaport_proto::keys::Keypair;

use crate::identity::{load_seed, random_seed};
use crate::target::{RegistryTarget, Resolver};

/// The arguments a service and a proxy share: which registry, who we are,
/// and how to find the registry.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// The registry: KEY (the registries under it are found through the
    /// DHT) or KEY@HOST:PORT, or several registries of one seed (a set,
    /// each followed at once) as KEY@HOST:PORT,HOST:PORT (at most 8).
    #[arg(env = "SEAPORT_REGISTRY", hide_env_values = true, value_name = "REGISTRY")]
    pub registry: RegistryTarget,
    /// This process's seed (default: a fresh identity each start).
    #[arg(long, env = "SEAPORT_SEED", hide_env_values = true, conflicts_with = "seed_file")]
    pub seed: Option<String>,
    /// Read the seed from this file instead (keeps it out of `ps`).
    #[arg(long, value_name = "FILE")]
    pub seed_file: Option<PathBuf>,
    /// Private DHT bootstrap nodes, HOST:PORT,... (for a bare KEY).
    #[arg(long, env = "SEAPORT_BOOTSTRAP", hide_env_values = true, value_name = "LIST")]
    pub bootstrap: Option<Bootstrap>,
    /// Worker threads (1 to 256). One event loop is fastest while a core is
    /// enough (no hand-offs between threads: see BENCHMARKS.md); give more
    /// to spread many busy connections over more cores.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,
    /// Print events as JSON objects, one a line (`ts`, `event`, fields; see
    /// README), instead of the text lines.
    #[arg(long)]
    pub json: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics, with /ready and
    /// /healthz (off by default; e.g. 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Print a completion script for this shell (bash, zsh, fish, elvish,
    /// powershell) and exit, e.g. `... --completions bash > /etc/bash_completion.d/seaport-proxy`.
    #[arg(long, value_name = "SHELL", exclusive = true)]
    pub completions: Option<clap_complete::Shell>,
    /// Read settings from this TOML file: a setting is a flag's long name
    /// (drain = "30s", json = true, allow = ["KEY", ...]; a proxy's ports as
    /// `[[map]]` tables with role, port and protocol = "udp"). Flags given
    /// here override the file's. kill -HUP rereads it: a proxy opens and
    /// closes ports to match its maps, a service takes its allow list.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ClientArgs {
    /// The identity: from `--seed`/`--seed-file`/`SEAPORT_SEED`, else fresh.
    pub fn keypair(&self) -> Result<Keypair, Failure> {
        let seed = load_seed(self.seed.as_deref(), self.seed_file.as_deref())
            .map_err(|e| Failure::Usage(e.to_string()))?;
        Ok(Keypair::from_seed(&seed.unwrap_or_else(random_seed)))
    }

    /// A resolver for the registry (a DHT node, started in the background,
    /// only for a bare key).
    pub fn resolver(&self) -> Resolver {
        Resolver::for_target(&self.registry, &self.bootstrap.clone().unwrap_or_default().0)
    }
}

/// The runtime a binary runs on: one event loop on the calling thread for
/// `threads == 1`, else a pool of that many workers.
pub fn runtime(threads: u16) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut pool = tokio::runtime::Builder::new_multi_thread();
        pool.worker_threads(usize::from(threads));
        pool
    };
    builder.enable_all().build()
}

/// Logs go to stderr (stdout carries only the event lines); `RUST_LOG`
/// filters them, `info` by default.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Raises the soft limit on open files to the hard limit: a registry or proxy
/// holds one descriptor per peer, and the usual soft limit (1024) is far
/// below what they are built to serve.
pub fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit { current: limit.maximum, maximum: limit.maximum };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!("cannot raise the open-file limit: {e}");
        }
    }
}

/// Why a binary stops with an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The user's mistake in arguments, files or environment: exit 2.
    Usage(String),
    /// Something failed at run time (a port in use, say): exit 1.
    Runtime(String),
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::Runtime(message)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Usage(message) | Failure::Runtime(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Failure {}

/// Ends the process for `failure`: a usage error in clap's form (exit 2), a
/// runtime error as `binary: message` (exit 1).
pub fn exit_with<A: clap::CommandFactory>(binary: &str, failure: Failure) -> ! {
    match failure {
        Failure::Usage(message) => {
            A::command().error(clap::error::ErrorKind::ValueValidation, message).exit()
        }
        Failure::Runtime(message) => fatal(binary, message),
    }
}

/// The shell of a `--completions SHELL` (or `--completions=SHELL`) in argv,
/// looked for before clap parses: a binary whose REGISTRY argument is
/// required must still print its completions without one.
pub fn completions_requested() -> Option<clap_complete::Shell> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = args.iter().enumerate().find_map(|(i, arg)| match arg.strip_prefix("--completions") {
        Some("") => args.get(i + 1).cloned(),
        Some(rest) => rest.strip_prefix('=').map(str::to_owned),
        None => None,
    })?;
    <clap_complete::Shell as clap::ValueEnum>::from_str(&value, true).ok()
}

/// Prints the completion script of `A` (the binary `name`) for `shell`.
pub fn print_completions<A: clap::CommandFactory>(shell: clap_complete::Shell, name: &str) {
    clap_complete::generate(shell, &mut A::command(), name, &mut std::io::stdout());
}

/// Prints `binary: message` on stderr and exits 1.
pub fn fatal(binary: &str, message: impl std::fmt::Display) -> ! {
    eprintln!("{binary}: {message}");
    std::process::exit(1)
}

/// Parses `10`, `10s`, `500ms`, `2m`, `1h` or `1.5s` as a duration (bare numbers are seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.starts_with('-') {
        return Err(format!("{text:?}: a duration cannot be negative"));
    }
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 =
        number.trim().parse().map_err(|_| format!("{text:?} is not a duration like 10s or 500ms"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?}: use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{text:?} is not a valid duration"))
}

/// A minute, for duration bounds.
pub const MINUTE: Duration = Duration::from_secs(60);
/// An hour, for duration bounds.
pub const HOUR: Duration = Duration::from_secs(3600);

/// A parser for durations from `min` to `max` inclusive, for clap's
/// `value_parser`; an error names the allowed range. Duration flags also set
/// `allow_hyphen_values`, so that `-1` reaches the parser and is refused as
/// negative rather than taken for a flag.
pub fn duration_in(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |text| {
        let value = parse_duration(text)?;
        if value < min || value > max {
            return Err(format!("{text:?} is out of range: use {} to {}", show(min), show(max)));
        }
        Ok(value)
    }
}

/// A duration as the user would write it: `0s`, `500ms`, `10s`, `2m`.
fn show(d: Duration) -> String {
    if d.subsec_millis() != 0 || d.is_zero() {
        return if d.is_zero() { "0s".into() } else { format!("{}ms", d.as_millis()) };
    }
    match d.as_secs() {
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// DHT bootstrap nodes, written `HOST:PORT,HOST:PORT`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bootstrap(pub Vec<String>);

impl std::str::FromStr for Bootstrap {
    type Err = String;
    /// Splits the list, checking each entry has a port.
    fn from_str(text: &str) -> Result<Bootstrap, String> {
        let mut nodes = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            match entry.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    nodes.push(entry.to_owned());
                }
                _ => return Err(format!("bootstrap node {entry:?} is not HOST:PORT")),
            }
        }
        Ok(Bootstrap(nodes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1").unwrap_err().contains("negative"));
    }

    #[test]
    fn ranges_name_their_bounds() {
        let ttl = duration_in(Duration::from_secs(1), Duration::from_secs(3600));
        assert_eq!(ttl("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(ttl("1h"), Ok(Duration::from_secs(3600)));
        let err = ttl("0").unwrap_err();
        assert!(err.contains("1s to 1h"), "{err}");
        let err = duration_in(Duration::from_millis(100), Duration::from_secs(60))("90s").unwrap_err();
        assert!(err.contains("100ms to 1m"), "{err}");
    }

    #[test]
    fn bootstrap_lists() {
        assert_eq!("a:1, b:2".parse(), Ok(Bootstrap(vec!["a:1".into(), "b:2".into()])));
        assert!("a".parse::<Bootstrap>().is_err());
    }
}
