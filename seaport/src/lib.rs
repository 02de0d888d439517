//! seaport as a library: offer a service under a role, or find one by a
//! version range and open streams to it, over encrypted peer-to-peer links,
//! with nothing but a registry's public key. The `seaport-service` and
//! `seaport-proxy` binaries are built on these same types.
//!
//! - [`Service`]: registers a role (`echo@1.0.0`) with every registry of a
//!   set and answers proxies' links. Each stream goes to a TCP backend
//!   ([`Streams::Tcp`]) or to this program ([`Streams::InProcess`],
//!   then [`Service::accept`]); an [`Accepted`] stream is
//!   `AsyncRead + AsyncWrite`.
//! - [`Client`]: looks ranges up (`echo@1.x`). [`Client::connect`] opens a
//!   [`Stream`] (`AsyncRead + AsyncWrite`) to an instance, failing over
//!   until one takes it; [`Client::watch`] yields a range's instances as
//!   they change; [`Client::instances`] asks once.
//! - [`subscribe`]: every [`Event`] of this process as a value, the same
//!   events the binaries print (registered, found, lost, links up, ...).
//!   A library prints nothing on stdout.
//!
//! # Quick start
//!
//! A registry runs somewhere (`seaport-registry`), and prints its key. Then
//! in one program (or two, on two hosts):
//!
//! ```no_run
//! use seaport::{Client, ClientOptions, Role, RoleQuery, Service, ServiceOptions, Streams};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let registry: seaport::RegistryTarget = "5b64a8...0d45@registry.lan:4500".parse()?;
//!
//! // Offer echo@1.0.0, its streams served here.
//! let role = Role::parse("echo@1.0.0")?;
//! let options = ServiceOptions::new(registry.clone(), seaport::generate_keypair(), role, Streams::InProcess);
//! let mut service = Service::start(options).await?;
//! let mut incoming = service.incoming().expect("streams are in-process");
//! tokio::spawn(async move {
//!     while let Some(mut stream) = incoming.accept().await {
//!         tokio::spawn(async move {
//!             let (mut reader, mut writer) = tokio::io::split(&mut stream);
//!             let _ = tokio::io::copy(&mut reader, &mut writer).await;
//!         });
//!     }
//! });
//!
//! // Anywhere: find any echo@1.x and talk to it.
//! let client = Client::start(ClientOptions::new(registry, seaport::generate_keypair()))?;
//! let mut stream = client.connect(&RoleQuery::parse("echo@1.x")?).await?;
//! stream.write_all(b"hello").await?;
//! let mut answer = [0; 5];
//! stream.read_exact(&mut answer).await?;
//! assert_eq!(&answer, b"hello");
//!
//! // Withdraw the role, let streams finish for up to a second.
//! client.close().await;
//! service.shutdown(std::time::Duration::from_secs(1)).await;
//! # Ok(())
//! # }
//! ```
//!
//! `examples/` has this as a program (`echo`), a hyper server registered as
//! a role (`http_server`), and a watcher (`watch`); README's "As a library"
//! says what is public and what may change.
//!
//! # Runtime
//!
//! Everything runs on the caller's tokio runtime (multi-threaded or not);
//! [`Service::start`] and [`Client::start`] must be called within it.
//! Metrics ([`seaport_net::metrics`]) are process-wide, as for a binary.

#![deny(missing_docs)]

pub use seaport_net::cli::Failure;
pub use seaport_net::event::{Event, SUBSCRIBED_EVENTS, subscribe};
pub use seaport_net::identity::random_seed;
pub use seaport_net::link::Accepted;
pub use seaport_net::proxy_header::Version as ProxyProtocol;
pub use seaport_net::target::RegistryTarget;
pub use seaport_proto::client::Strategy;
pub use seaport_proto::keys::{Keypair, PublicKey, Seed};
pub use seaport_proto::message::Instance;
pub use seaport_proto::role::{Protocol, Role, RoleQuery};
pub use seaport_proxy::{Client, ClientOptions, LookupError, MAX_ROUTES, MAX_WATCHES, Stream, Watch};
pub use seaport_service::{ACCEPT_QUEUE, Incoming, Service, ServiceOptions, Streams};

/// A fresh identity from the operating system's randomness. Keep its seed
/// ([`random_seed`], then [`Keypair::from_seed`]) to have the same key at
/// the next start, as the binaries' `--seed-file` does.
pub fn generate_keypair() -> Keypair {
    Keypair::from_seed(&random_seed())
}
