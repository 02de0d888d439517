//! seaport-bench: measures seaport against what a user would otherwise use,
//! side by side in one run on loopback:
//! - **direct**: straight to the backend (this machine's physical limit);
//! - **relay**: two hops of a plain TCP relay (proxy + service's shape, no crypto);
//! - **seaport**: through `seaport-proxy` and `seaport-service`;
//! - **bore**, with `--bore PATH`: the plain TCP tunnel bore (bulk and new
//!   connections only), the bar the performance issue names.
//!
//! `cargo run --release -p seaport-bench -- [--quick] [--json]`. It builds the
//! release binaries, starts every process itself, and prints a table with
//! ratios. Figures are for comparison within one run, never absolute claims.

// A benchmark driver: a failure to set up is fatal, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod measure;
mod peers;
mod scale;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use peers::{Peer, free_port};

#[derive(Debug, Parser)]
#[command(about = "Benchmark seaport against a direct connection and a plain two-hop relay, on loopback")]
struct Args {
    /// A short run (64 MiB, fewer rounds, 1,000 idle connections): a smoke test, not figures.
    #[arg(long)]
    quick: bool,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Idle connections for the memory-per-connection figure.
    #[arg(long)]
    connections: Option<usize>,
    /// Bytes per bulk transfer (default 1 GiB, 64 MiB with --quick).
    #[arg(long)]
    bytes: Option<u64>,
    /// Rounds of the bulk transfers (median reported; default 3, 1 with --quick).
    #[arg(long)]
    repeat: Option<usize>,
    /// Service sessions for the `scale` part (10 roles each, as many
    /// watcher sessions besides): default 10,000 (100,000 instances, 1,000
    /// watchers on each of 10 roles), 200 with --quick.
    #[arg(long)]
    sessions: Option<usize>,
    /// Run only these parts, comma-separated: bulk, latency, connect, hol,
    /// fair, redis, idle, lookups, scale (to profile one with perf). `redis`
    /// needs redis-server and redis-benchmark (Debian's redis-server,
    /// redis-tools) and is skipped with a note without them. `scale` drives
    /// a registry of its own with many sessions from this process (one
    /// registry at scale: RSS per session and instance, fan-out of one
    /// change, lookups/s, churn, and every session back after a restart).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// A bore executable (`cargo install bore-cli --root DIR`, for the bench
    /// only): adds bore, a plain TCP tunnel (server + local client, 8 KiB
    /// copies, no encryption), as a fourth path to bulk and connect.
    #[arg(long, value_name = "PATH")]
    bore: Option<std::path::PathBuf>,
    #[command(subcommand)]
    role: Option<Role>,
}

/// The processes this executable also plays.
#[derive(Debug, Subcommand)]
enum Role {
    /// The sink/source/echo backend.
    #[command(hide = true)]
    Backend,
    /// One plain relay hop to `to`.
    #[command(hide = true)]
    Relay { to: SocketAddr },
}

#[derive(Debug, Clone, Copy)]
enum Better {
    Higher,
    Lower,
}

/// One line of the table.
struct Row {
    name: String,
    unit: &'static str,
    better: Better,
    direct: Option<f64>,
    relay: Option<f64>,
    seaport: Option<f64>,
    bore: Option<f64>,
}

impl Row {
    /// A figure measured on direct, relay and seaport (bore added by the caller, when measured).
    fn all(name: String, unit: &'static str, better: Better, [direct, relay, seaport]: [f64; 3]) -> Row {
        Row {
            name,
            unit,
            better,
            direct: Some(direct),
            relay: Some(relay),
            seaport: Some(seaport),
            bore: None,
        }
    }

    /// A figure only seaport has (lower is better unless changed).
    fn seaport(name: String, unit: &'static str, value: f64) -> Row {
        Row { name, unit, better: Better::Lower, direct: None, relay: None, seaport: Some(value), bore: None }
    }
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    match args.role {
        Some(Role::Backend) => runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            println!("listening {}", listener.local_addr().unwrap());
            peers::serve_backend(listener).await;
        }),
        Some(Role::Relay { to }) => runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            println!("listening {}", listener.local_addr().unwrap());
            peers::serve_relay(listener, to).await;
        }),
        None => {
            let rows = runtime.block_on(run(&args));
            if args.json { print_json(&rows) } else { print_table(&rows) }
        }
    }
}

/// Raises the open-file limit for this process and its children (10,000 idle
/// client connections take 10,000 descriptors in the proxy, as many in the
/// service for their backend connections).
fn raise_fd_limit(want: u64) -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let _ = setrlimit(Resource::Nofile, Rlimit { current: Some(want), maximum: Some(want) });
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_none_or(|c| c < want) {
        let hard = limit.maximum;
        let _ = setrlimit(Resource::Nofile, Rlimit { current: hard, maximum: hard });
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

fn listening(peer: &mut Peer) -> SocketAddr {
    peer.wait_line("listening").rsplit(' ').next().unwrap().parse().unwrap()
}

async fn run(args: &Args) -> Vec<Row> {
    let quick = args.quick;
    let bytes: u64 = args.bytes.unwrap_or(if quick { 64 << 20 } else { 1 << 30 });
    let rounds = if quick { 2_000 } else { 20_000 };
    let fresh = if quick { 200 } else { 2_000 };
    let rounds_bulk = args.repeat.unwrap_or(if quick { 1 } else { 3 });
    let mut idle = args.connections.unwrap_or(if quick { 1_000 } else { 10_000 });
    let limit = raise_fd_limit(65_536);
    if (idle as u64) * 2 + 512 > limit {
        idle = ((limit.saturating_sub(512)) / 2) as usize;
        eprintln!("open-file limit {limit}: measuring {idle} idle connections");
    }

    let bin = peers::build_binaries();
    let me = std::env::current_exe().unwrap();
    let mut backend = Peer::start("backend", &me, &["backend"]);
    let backend_addr = listening(&mut backend);
    let mut hop2 = Peer::start("relay hop 2", &me, &["relay", &backend_addr.to_string()]);
    let hop2_addr = listening(&mut hop2);
    let mut hop1 = Peer::start("relay hop 1", &me, &["relay", &hop2_addr.to_string()]);
    let relay_addr = listening(&mut hop1);

    let seed = "11".repeat(32);
    let registry_listen = format!("127.0.0.1:{}", free_port());
    let mut registry = Peer::start(
        "registry",
        &bin.join("seaport-registry"),
        &["--seed", &seed, "--listen", &registry_listen, "--no-dht", "--max-registrations", "20000"],
    );
    let key_line = registry.wait_line("Connect with pubkey");
    let key = key_line.rsplit(' ').next().unwrap().to_owned();
    let target = format!("{key}@{registry_listen}");
    let backend_port = backend_addr.port().to_string();
    let mut service = Peer::start(
        "service",
        &bin.join("seaport-service"),
        &[&target, "-p", &backend_port, "-r", "bench@1.0.0", "--listen", "127.0.0.1:0"],
    );
    service.wait_line("registered service");
    let proxy_port = free_port();
    let proxy_metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut proxy = Peer::start(
        "proxy",
        &bin.join("seaport-proxy"),
        &[&target, "-p", &proxy_port.to_string(), "-r", "bench", "--metrics", &proxy_metrics.to_string()],
    );
    proxy.wait_line("proxy from");
    let seaport_addr: SocketAddr = format!("127.0.0.1:{proxy_port}").parse().unwrap();
    // A second proxy, so a second link to the same service, for the
    // head-of-line figure's baseline.
    let other_port = free_port();
    let mut other_proxy = Peer::start(
        "second proxy",
        &bin.join("seaport-proxy"),
        &[&target, "-p", &other_port.to_string(), "-r", "bench"],
    );
    other_proxy.wait_line("proxy from");
    let other_addr: SocketAddr = format!("127.0.0.1:{other_port}").parse().unwrap();
    // A third proxy with early data (opt-in), for the new-connection figure.
    let early_port = free_port();
    let mut early_proxy = Peer::start(
        "early-data proxy",
        &bin.join("seaport-proxy"),
        &[&target, "-p", &early_port.to_string(), "-r", "bench", "--early-data"],
    );
    early_proxy.wait_line("proxy from");
    let early_addr: SocketAddr = format!("127.0.0.1:{early_port}").parse().unwrap();
    let targets = [backend_addr, relay_addr, seaport_addr];
    let bore = args.bore.as_deref().map(|path| peers::start_bore(path, backend_addr));
    let bore_addr = bore.as_ref().map(|(_, _, addr)| *addr);

    // Warm up every path.
    for addr in targets.into_iter().chain([early_addr]).chain(bore_addr) {
        measure::new_connections(addr, 20).await.unwrap();
    }

    let wants = |part: &str| args.only.is_empty() || args.only.iter().any(|o| o == part);
    let mut rows = Vec::new();

    if wants("bulk") {
        // Rounds alternate the three paths, so a burst of load from elsewhere on
        // this shared machine hits all of them; each figure is the median round.
        let (mut up, mut down) = ([(); 4].map(|()| Vec::new()), [(); 4].map(|()| Vec::new()));
        let mut peak = (0, 0);
        proxy.reset_peak();
        service.reset_peak();
        for _ in 0..rounds_bulk {
            for (i, addr) in targets.into_iter().chain(bore_addr).enumerate() {
                up[i].push(measure::bulk_up(addr, bytes).await.unwrap());
                down[i].push(measure::bulk_down(addr, bytes).await.unwrap());
            }
            peak = (peak.0.max(proxy.memory_kib().1), peak.1.max(service.memory_kib().1));
        }
        let size = bytes >> 20;
        for (name, rounds) in [("upload", up), ("download", down)] {
            let [direct, relay, seaport, bore] = rounds.map(median);
            rows.push(Row {
                bore: bore_addr.map(|_| bore),
                ..Row::all(
                    format!("bulk {name}, {size} MiB"),
                    "MB/s",
                    Better::Higher,
                    [direct, relay, seaport],
                )
            });
        }
        rows.push(Row::seaport("peak RSS during bulk: proxy".into(), "MB", peak.0 as f64 / 1024.0));
        rows.push(Row::seaport("peak RSS during bulk: service".into(), "MB", peak.1 as f64 / 1024.0));
    }

    if wants("latency") {
        let (mut p50, mut p99) = ([0.0; 3], [0.0; 3]);
        for (i, addr) in targets.into_iter().enumerate() {
            let mut times = measure::request_response(addr, rounds).await.unwrap();
            p50[i] = measure::percentile_us(&mut times, 50.0);
            p99[i] = measure::percentile_us(&mut times, 99.0);
        }
        rows.push(Row::all("request/response 64 B, p50".into(), "µs", Better::Lower, p50));
        rows.push(Row::all("request/response 64 B, p99".into(), "µs", Better::Lower, p99));
    }

    if wants("connect") {
        // Paths in turn: direct, relay, seaport, seaport with early data, bore.
        let (mut p50, mut p99) = ([f64::NAN; 5], [f64::NAN; 5]);
        let before = measure::stream_open_totals(proxy_metrics).await.unwrap();
        for (i, addr) in targets.into_iter().chain([early_addr]).chain(bore_addr).enumerate() {
            let mut times = measure::new_connections(addr, fresh).await.unwrap();
            p50[i] = measure::percentile_us(&mut times, 50.0);
            p99[i] = measure::percentile_us(&mut times, 99.0);
        }
        let after = measure::stream_open_totals(proxy_metrics).await.unwrap();
        for (name, [direct, relay, seaport, early, bore]) in [("p50", p50), ("p99", p99)] {
            let row = format!("new connection to first byte, {name}");
            rows.push(Row {
                bore: bore_addr.map(|_| bore),
                ..Row::all(row, "µs", Better::Lower, [direct, relay, seaport])
            });
            let row = format!("  … with seaport-proxy --early-data, {name}");
            rows.push(Row::all(row, "µs", Better::Lower, [direct, relay, early]));
        }
        // What the open itself costs (OPEN out to ACCEPT in, the service's
        // backend connect included), as the proxy measured it.
        let open_us = (after.0 - before.0) / (after.1 - before.1) * 1e6;
        rows.push(Row::seaport("  of which opening the stream (proxy's mean)".into(), "µs", open_us));
    }

    if wants("hol") {
        // A request behind a bulk transfer on the same link, against the same
        // request while the bulk transfer runs on another link: same CPU load,
        // only the sharing differs. Rounds that alternate the two, as for
        // bulk, so a burst of load from elsewhere hits both alike; each
        // figure is the median of its rounds' p50s.
        let mut p50 = [Vec::new(), Vec::new()];
        for _ in 0..rounds_bulk {
            for (i, bulk) in [seaport_addr, other_addr].into_iter().enumerate() {
                measure::new_connections(seaport_addr, 5).await.unwrap();
                let load = measure::background_download(bulk);
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut times = measure::request_response(seaport_addr, rounds / 8).await.unwrap();
                load.abort();
                p50[i].push(measure::percentile_us(&mut times, 50.0));
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        let [same, other] = p50.map(median);
        rows.push(Row::seaport("request/response p50 beside bulk, same link".into(), "µs", same));
        rows.push(Row::seaport("request/response p50 beside bulk, other link".into(), "µs", other));
        rows.push(Row::seaport("  same link / other link".into(), "×", same / other));
    }

    if wants("fair") {
        let (shares, rate) = measure::two_downloads(seaport_addr, bytes / 2).await.unwrap();
        let low = shares[0].min(shares[1]) * 100.0;
        rows.push(Row {
            better: Better::Higher,
            ..Row::seaport("two bulk streams on one link: smaller share".into(), "%", low)
        });
        rows.push(Row {
            better: Better::Higher,
            ..Row::seaport("two bulk streams on one link: together".into(), "MB/s", rate)
        });
    }

    if wants("redis") {
        match redis_connections(&bin, &me, &target, quick) {
            Ok(rates) => {
                let name = "new connections/s, redis-benchmark -k 0 -c 50".into();
                rows.push(Row::all(name, "/s", Better::Higher, rates));
            }
            Err(why) => eprintln!("redis part skipped: {why}"),
        }
    }

    if wants("idle") {
        // RSS per idle connection in each of the two middle processes.
        let mut per_conn = [[f64::NAN; 2]; 2];
        for (i, (addr, middle)) in
            [(relay_addr, [&hop1, &hop2]), (seaport_addr, [&proxy, &service])].into_iter().enumerate()
        {
            let before = middle.map(|p| p.memory_kib().0);
            let open = measure::open_idle(addr, idle).await.unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = middle.map(|p| p.memory_kib().0);
            for side in 0..2 {
                per_conn[i][side] = (after[side] as f64 - before[side] as f64) / idle as f64;
            }
            drop(open);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        for (side, name) in ["proxy / hop 1", "service / hop 2"].into_iter().enumerate() {
            rows.push(Row {
                name: format!("idle connections ({idle}), RSS each: {name}"),
                unit: "KiB",
                better: Better::Lower,
                direct: None,
                relay: Some(per_conn[0][side]),
                seaport: Some(per_conn[1][side]),
                bore: None,
            });
        }
    }

    if wants("lookups") {
        let registry_addr: SocketAddr = registry_listen.parse().unwrap();
        let registry_key = key.parse().unwrap();
        let (instances, lookups) = if quick { (1_000, 5_000) } else { (10_000, 100_000) };
        let rate =
            measure::lookups_per_second(registry_addr, &registry_key, instances, lookups, 64).await.unwrap();
        rows.push(Row {
            better: Better::Higher,
            ..Row::seaport(format!("registry lookups, {instances} instances"), "/s", rate)
        });
    }
    drop((backend, hop1, hop2, registry, service, proxy, other_proxy, early_proxy, bore));

    if wants("scale") {
        let size = scale::Size::new(quick, args.sessions);
        for f in scale::run(&bin, size, limit).await {
            let better = if f.higher_is_better { Better::Higher } else { Better::Lower };
            rows.push(Row { better, ..Row::seaport(f.name, f.unit, f.value) });
        }
    }
    rows
}

/// New connections per second with a real client: `redis-benchmark -k 0`
/// (a new connection per request, 50 at once) against redis-server directly,
/// through two relay hops, and through a seaport service and proxy.
fn redis_connections(
    bin: &std::path::Path,
    me: &std::path::Path,
    target: &str,
    quick: bool,
) -> Result<[f64; 3], String> {
    let found = |tool: &str| std::process::Command::new(tool).arg("--version").output().is_ok();
    if !found("redis-server") || !found("redis-benchmark") {
        return Err(
            "redis-server or redis-benchmark not installed (Debian: redis-server, redis-tools)".into()
        );
    }
    let port = free_port().to_string();
    let mut redis = Peer::start(
        "redis-server",
        std::path::Path::new("redis-server"),
        &["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
    );
    redis.wait_line("Ready to accept connections");
    let redis_addr = format!("127.0.0.1:{port}");
    let mut hop2 = Peer::start("redis relay hop 2", me, &["relay", &redis_addr]);
    let hop2_addr = listening(&mut hop2);
    let mut hop1 = Peer::start("redis relay hop 1", me, &["relay", &hop2_addr.to_string()]);
    let relay_addr = listening(&mut hop1);
    let mut service = Peer::start(
        "redis service",
        &bin.join("seaport-service"),
        &[target, "-p", &port, "-r", "redis@7.0.15", "--listen", "127.0.0.1:0"],
    );
    service.wait_line("registered service");
    let proxy_port = free_port().to_string();
    let mut proxy =
        Peer::start("redis proxy", &bin.join("seaport-proxy"), &[target, "-p", &proxy_port, "-r", "redis@7"]);
    proxy.wait_line("proxy from");
    let requests = if quick { "2000" } else { "20000" };
    let mut rates = [0.0; 3];
    for (i, port) in [port.clone(), relay_addr.port().to_string(), proxy_port.clone()].iter().enumerate() {
        let out = std::process::Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", port, "-k", "0", "-c", "50", "-n", requests, "-t", "ping", "-q"])
            .output()
            .map_err(|e| format!("redis-benchmark: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "PING_INLINE: 12345.67 requests per second, p50=..." (the last of
        // the lines redis-benchmark rewrites in place with \r).
        let rate = text
            .split(['\r', '\n'])
            .filter(|l| l.contains("requests per second"))
            .filter_map(|l| l.split(": ").nth(1)?.split(' ').next()?.parse::<f64>().ok())
            .next()
            .ok_or_else(|| format!("no rate in redis-benchmark's output: {text}"))?;
        rates[i] = rate;
    }
    drop((redis, hop1, hop2, service, proxy));
    Ok(rates)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn fmt(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_nan() => "-".into(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.2}"),
        None => "-".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 && !a.is_nan() && !b.is_nan() => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

fn print_table(rows: &[Row]) {
    // bore's columns only when the run measured it.
    let with_bore = rows.iter().any(|r| r.bore.is_some());
    let (bore_head, bore_rule) = if with_bore {
        (format!(" {:>9} | {:>10} |", "bore", "vs bore"), format!("{:->11}|{:->12}|", "", ""))
    } else {
        Default::default()
    };
    println!(
        "| {:<44} | {:>5} | {:>9} | {:>9} | {:>9} | {:>10} | {:>10} |{bore_head}",
        "measure", "unit", "direct", "relay", "seaport", "vs direct", "vs relay"
    );
    println!(
        "|{:-<46}|{:->7}|{:->11}|{:->11}|{:->11}|{:->12}|{:->12}|{bore_rule}",
        "", "", "", "", "", "", ""
    );
    for r in rows {
        let arrow = match r.better {
            Better::Higher => "↑",
            Better::Lower => "↓",
        };
        let bore = if with_bore {
            format!(" {:>9} | {:>10} |", fmt(r.bore), ratio(r.seaport, r.bore))
        } else {
            String::new()
        };
        println!(
            "| {:<44} | {:>5} | {:>9} | {:>9} | {:>9} | {:>10} | {:>10} |{bore}",
            format!("{} {arrow}", r.name),
            r.unit,
            fmt(r.direct),
            fmt(r.relay),
            fmt(r.seaport),
            ratio(r.seaport, r.direct),
            ratio(r.seaport, r.relay)
        );
    }
}

fn print_json(rows: &[Row]) {
    let num = |v: Option<f64>| match v {
        Some(v) if v.is_finite() => format!("{v:.3}"),
        _ => "null".into(),
    };
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"measure\": \"{}\", \"unit\": \"{}\", \"higher_is_better\": {}, \"direct\": {}, \"relay\": {}, \"seaport\": {}, \"bore\": {}}}",
                r.name,
                r.unit,
                matches!(r.better, Better::Higher),
                num(r.direct),
                num(r.relay),
                num(r.seaport),
                num(r.bore)
            )
        })
        .collect();
    println!("[\n  {}\n]", items.join(",\n  "));
}
