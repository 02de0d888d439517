//! `seaport-service`: answers links from proxies, connects each of their
//! streams to a local TCP backend (or, with `--udp`, each of their UDP
//! flows to a local UDP backend), and keeps its role registered with every
//! registry of the set.

mod service;

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use seaport_net::cli::{ClientArgs, Failure, HOUR, MINUTE, duration_in};
use seaport_net::metrics::readiness;
use seaport_proto::keys::PublicKey;
use seaport_proto::role::Role;
use tokio::sync::watch;

pub use service::{ACCEPT_QUEUE, Incoming, Service, ServiceOptions, Streams};

/// Expose a local TCP port under a role: proxies anywhere that look the role
/// up in the registry reach it over an encrypted link.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  seaport-service 5b64a8...0d45 -p 5984 -r couchdb@3.2.2\n  seaport-service 5b64a8...0d45@registry.lan:4500 -p 8080 -r web@1.4.0 --tag eu\n  seaport-service 5b64a8...0d45 -p 53 --udp -r dns@1.0.0\n  seaport-service 5b64a8...0d45 -p 53 --udp-port 53 -r dns@1.0.0   (TCP and UDP)"
)]
pub struct Args {
    /// Registry, identity and DHT options, shared with the other client binary.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The local TCP port of the backend to expose (a UDP port with --udp).
    #[arg(short, long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// The backend is a UDP port (DNS, WireGuard, syslog, a game server):
    /// each client address at a proxy becomes a flow with its own socket
    /// toward the backend. The role is registered as UDP and is served only
    /// by proxies asked for UDP (`--udp`, `--map ROLE=PORT/udp`). A UDP
    /// backend is not checked (UDP has nothing to connect to): the role is
    /// registered at once.
    #[arg(long, conflicts_with = "udp_port")]
    pub udp: bool,
    /// Start each backend connection with a PROXY protocol header (v1 or
    /// v2, as nginx's `listen ... proxy_protocol` and HAProxy's
    /// `accept-proxy` take): the backend sees the client's address and port
    /// as the proxy saw them instead of 127.0.0.1, and with v2 the proxy's
    /// public key (TLV 0xE0, 64 hex characters). Off by default: a backend
    /// that does not expect the header would take it for data. Health
    /// checks send a LOCAL (v2) or UNKNOWN (v1) header. TCP only.
    #[arg(long, value_name = "VERSION", conflicts_with = "udp",
          value_parser = PossibleValuesParser::new(["v1", "v2"]).try_map(|s| s.parse::<seaport_net::proxy_header::Version>()))]
    pub proxy_protocol: Option<seaport_net::proxy_header::Version>,
    /// Also forward UDP datagrams of the role to this local UDP port, beside
    /// TCP connections to -p (DNS on 53/tcp and 53/udp): the role is
    /// registered for both, and a proxy's TCP and UDP ports for it share
    /// one link to this service.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub udp_port: Option<u16>,
    /// The role and exact version offered, e.g. couchdb@3.2.2.
    #[arg(short, long, value_name = "ROLE@VERSION", value_parser = |s: &str| Role::parse(s).map_err(|e| e.to_string()))]
    pub role: Role,
    /// The backend's host.
    #[arg(long, value_name = "HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// A tag shown with lookups (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// TCP address for incoming links.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:0")]
    pub listen: SocketAddr,
    /// On SIGTERM, how long open streams may take to finish (0s to 1h).
    #[arg(long, value_name = "DURATION", default_value = "10s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::ZERO, HOUR))]
    pub drain: Duration,
    /// How often the backend is checked (a TCP connect); while it is down
    /// the role is withdrawn from the registry (100ms to 1h).
    #[arg(long, value_name = "DURATION", default_value = "2s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::from_millis(100), HOUR))]
    pub check_interval: Duration,
    /// With --udp or --udp-port: how long a flow lives without a datagram either way
    /// before its socket toward the backend is closed (1s to 1h).
    #[arg(long, value_name = "DURATION", default_value = "60s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::from_secs(1), HOUR))]
    pub flow_idle: Duration,
    /// With --udp or --udp-port: most flows (each a socket toward the backend) all proxies
    /// together may hold at once (1 or more); a datagram that would open
    /// one more is dropped.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_flows: u32,
    /// With --udp or --udp-port: most flows one proxy (by key) may hold at once (1 or more).
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_flows_per_proxy: u32,
    /// Accept links only from this proxy key (repeatable; default: any
    /// proxy, since the registry tells this service's key to anyone who looks
    /// its role up). See also --allow-file.
    #[arg(long = "allow", value_name = "KEY", value_parser = |s: &str| s.parse::<PublicKey>().map_err(|e| e.to_string()))]
    pub allow: Vec<PublicKey>,
    /// Accept links only from the keys in this file (one a line, `#`
    /// comments), with any --allow keys; reread on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub allow_file: Option<std::path::PathBuf>,
    /// Most streams (client connections) all proxies together may hold open
    /// at once (1 or more); more are refused, and a proxy tries another
    /// instance. An idle stream costs about 2 KiB here.
    #[arg(long, value_name = "N", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams: u32,
    /// Most streams one proxy (by key) may hold open at once (1 or more), so
    /// that one proxy cannot take them all. A proxy also holds at most 64
    /// links to a service.
    #[arg(long, value_name = "N", default_value_t = 12_288, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_proxy: u32,
    /// Answer no meetings: proxies reach this service only at its --listen
    /// address, never by hole punching or through the registry's relay.
    /// Also the default when --listen is a loopback address.
    #[arg(long)]
    pub no_meet: bool,
    /// How long a link handshake, and a stream's backend connect, may take (100ms to 10m).
    #[arg(long, value_name = "DURATION", default_value = "10s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::from_millis(100), 10 * MINUTE))]
    pub handshake_timeout: Duration,
    /// How long a link whose path is lost (a registry relaying it died, a
    /// NAT forgot it, an address went away) waits to be resumed on another
    /// path before its streams are reset (1s to 10m). Streams ride through
    /// such a loss unharmed when a path comes back within it.
    #[arg(long, value_name = "DURATION", default_value = "10s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::from_secs(1), 10 * MINUTE))]
    pub resume_within: Duration,
}

impl Args {
    /// The service these flags ask for (the backend's host resolved).
    pub async fn service_options(&self) -> Result<ServiceOptions, Failure> {
        let role =
            self.role.clone().with_tags(self.tags.clone()).map_err(|e| Failure::Usage(e.to_string()))?;
        let resolve = |port: u16| {
            let host = self.host.clone();
            async move {
                tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| format!("cannot resolve backend host {host:?}"))
            }
        };
        let backend = resolve(self.port).await?;
        let (streams, udp) = match (self.udp, self.udp_port) {
            (true, _) => (Streams::None, Some(backend)),
            (false, Some(port)) => (Streams::Tcp(backend), Some(resolve(port).await?)),
            (false, None) => (Streams::Tcp(backend), None),
        };
        let mut options =
            ServiceOptions::new(self.client.registry.clone(), self.client.keypair()?, role, streams);
        options.udp = udp;
        options.bootstrap = self.client.bootstrap.clone().unwrap_or_default().0;
        options.proxy_protocol = self.proxy_protocol;
        options.listen = self.listen;
        options.no_meet = self.no_meet;
        options.check_interval = self.check_interval;
        options.flow_idle = self.flow_idle;
        options.max_flows = self.max_flows;
        options.max_flows_per_proxy = self.max_flows_per_proxy;
        options.allow = self.allow.clone();
        options.allow_file = self.allow_file.clone();
        options.max_streams = self.max_streams;
        options.max_streams_per_proxy = self.max_streams_per_proxy;
        options.handshake_timeout = self.handshake_timeout;
        options.resume_within = self.resume_within;
        Ok(options)
    }
}

/// Runs until SIGINT/SIGTERM; errors are one line for the user.
pub async fn run(args: Args) -> Result<(), Failure> {
    seaport_net::event::print_events(args.client.json);
    let options = args.service_options().await?;
    // Not ready before the metrics port answers: the condition is set
    // before it opens (the service sets it again, for library users).
    readiness().set(service::READY, Some(format!("{} is not registered yet", options.role)));
    // Lives as long as `run`: dropping it stops the HTTP server.
    let (_http_stop, http_stop) = watch::channel(false);
    seaport_net::http::start(args.client.metrics, None, http_stop).await?;
    let service = Service::start(options).await?;
    let reloads = tokio::spawn(seaport_net::signal::on_hangup({
        let (allow, config) = (service.allow_list(), args.client.config.clone());
        move || {
            // With --config, the file says which keys and which allow file.
            let reread = match &config {
                Some(path) => match seaport_net::config::reread::<Args>(path) {
                    Ok(new) => allow.reconfigure(new.allow, new.allow_file),
                    Err(e) => Err(e),
                },
                None => allow.reload(),
            };
            match reread {
                Ok(n) => tracing::info!("allow list reread: {n} keys"),
                Err(e) => tracing::error!("allow list not reread, the old one stays: {e}"),
            }
        }
    }));
    seaport_net::signal::shutdown_signal().await;
    seaport_net::notify::stopping();
    reloads.abort();
    service.shutdown(args.drain).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn new_options_are_the_binarys_defaults() {
        let key =
            seaport_proto::keys::Keypair::from_seed(&seaport_proto::keys::Seed::from_bytes([7; 32])).public();
        let target = format!("{key}@127.0.0.1:4500");
        let args =
            Args::try_parse_from(["seaport-service", &target, "-p", "5984", "-r", "couchdb@3.2.2"]).unwrap();
        let flags = args.service_options().await.unwrap();
        let new = ServiceOptions::new(
            flags.registry.clone(),
            flags.keypair.clone(),
            flags.role.clone(),
            Streams::Tcp(SocketAddr::from(([127, 0, 0, 1], 5984))),
        );
        assert_eq!(format!("{new:?}"), format!("{flags:?}"));
        // --udp serves no streams, --udp-port both.
        let udp = Args::try_parse_from(["seaport-service", &target, "-p", "53", "--udp", "-r", "dns@1.0.0"])
            .unwrap();
        let udp = udp.service_options().await.unwrap();
        assert_eq!((udp.streams, udp.udp), (Streams::None, Some(SocketAddr::from(([127, 0, 0, 1], 53)))));
    }
}
