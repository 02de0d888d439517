//! The operations HTTP server: `/metrics`, `/ready` and `/healthz` for
//! `--metrics`, and the registry's page (`/`, `/api/instances`) for
//! `--http`, over a minimal HTTP/1 server (hyper).
//!
//! Read-only: every route answers GET (and HEAD) from state the process
//! already keeps; no request changes anything, and no request body is
//! read. Bounds: at most [`MAX_CONNECTIONS`] connections at once (more are
//! closed at once), [`RESERVED_FOR_LOCALHOST`] of them kept for 127.0.0.1
//! and ::1 (a monitor on this host still gets `/healthz` and `/ready` while
//! others hold every other slot), request headers must arrive within
//! [`HEADER_TIMEOUT`], and a connection lives at most
//! [`CONNECTION_LIFETIME`] (a page polling over keep-alive simply opens
//! another).

use std::convert::Infallible;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use seaport_proto::registry::Source;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::limit::{Limit, Over};
use crate::metrics::{metrics, readiness};

/// Most HTTP connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Most of them from one source (an IPv4 address or an IPv6 /64), so that
/// one client cannot lock the health checks out.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 16;
/// Of [`MAX_CONNECTIONS`], how many only 127.0.0.1 and ::1 may use. Only
/// those two addresses: the rest of 127.0.0.0/8 is as foreign as any.
pub const RESERVED_FOR_LOCALHOST: usize = 8;
/// How long a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection may stay open.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// What a listener serves.
#[derive(Clone, Default)]
pub struct Site {
    /// `/metrics` (and `/ready`, `/healthz`, which every listener serves).
    pub metrics: bool,
    /// The registry's page and its JSON, rendered fresh on each request.
    pub page: Option<Arc<dyn Page>>,
}

/// The registry's page: its data as JSON, and the HTML that shows it.
pub trait Page: Send + Sync {
    /// The `/api/instances` document.
    fn json(&self) -> String;
    /// The `/` document.
    fn html(&self) -> &'static str;
}

/// Serves `site` on `listener` until `stop` turns true (or its sender is
/// dropped).
pub async fn serve(listener: TcpListener, site: Site, mut stop: watch::Receiver<bool>) {
    let site = Arc::new(site);
    let slots = Limit::new(MAX_CONNECTIONS - RESERVED_FOR_LOCALHOST, MAX_CONNECTIONS_PER_SOURCE);
    let reserved = Limit::new(RESERVED_FOR_LOCALHOST, RESERVED_FOR_LOCALHOST);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else {
                    // Out of file descriptors and the like: pause rather than spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                // A dual-stack listener sees 127.0.0.1 as ::ffff:127.0.0.1.
                let ip = peer.ip().to_canonical();
                let localhost = ip == Ipv4Addr::LOCALHOST || ip == Ipv6Addr::LOCALHOST;
                let source = Source::of(peer.ip());
                let permit = match slots.take(source) {
                    Ok(permit) => permit,
                    Err(_) if localhost && let Ok(permit) = reserved.take(source) => permit,
                    Err(Over::All(_)) => {
                        tracing::debug!(%peer, "too many HTTP connections; closing this one");
                        continue;
                    }
                    Err(Over::Key(_)) => {
                        tracing::debug!(%peer, "too many HTTP connections from this address; closing this one");
                        continue;
                    }
                };
                let site = site.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let site = site.clone();
                        async move { Ok::<_, Infallible>(answer(&site, &request)) }
                    });
                    let mut builder = hyper::server::conn::http1::Builder::new();
                    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                        tracing::debug!(%peer, "HTTP connection ended: {e}");
                    }
                    drop(permit);
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { return },
        }
    }
}

fn answer(site: &Site, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "read-only: GET and HEAD only\n".to_owned());
    }
    if !plain_host(request) {
        return text(
            StatusCode::MISDIRECTED_REQUEST,
            "name this server by its IP address or localhost: other host names are refused, so that no web page can reach it through DNS rebinding\n".to_owned(),
        );
    }
    match (request.uri().path(), &site.page) {
        ("/healthz", _) => text(StatusCode::OK, "ok\n".to_owned()),
        ("/ready", _) => match readiness().check() {
            Ok(()) => text(StatusCode::OK, "ready\n".to_owned()),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        },
        ("/metrics", _) if site.metrics => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics().encode(),
        ),
        ("/", Some(page)) => respond(StatusCode::OK, "text/html; charset=utf-8", page.html().to_owned()),
        ("/api/instances", Some(page)) => respond(StatusCode::OK, "application/json", page.json()),
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    }
}

/// Whether the request names this server by an IP literal or `localhost`
/// (with or without a port), in one `Host` header of plain ASCII. A browser
/// sends the page's own host name, so a hostile page that rebinds its name
/// to this address is refused, while curl, Prometheus and a browser pointed
/// at `127.0.0.1:PORT` all pass. Two `Host` headers, or one that is not
/// ASCII, are refused: the name checked must be the name any proxy between
/// would use.
fn plain_host(request: &Request<Incoming>) -> bool {
    let mut hosts = request.headers().get_all(hyper::header::HOST).iter();
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        // None: HTTP/1.0 without Host, not what a browser sends. Two: refused.
        return request.headers().get(hyper::header::HOST).is_none();
    };
    let Ok(host) = host.to_str() else { return false };
    let name = match host.strip_prefix('[') {
        Some(v6) => return v6.split(']').next().is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()),
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body)
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    // Every answer is live state: a cached one would be wrong.
    headers.insert(CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-store"));
    response
}

/// Binds the listeners that `--metrics` and `--http` ask for and serves
/// them until `stop`: one listener when both name the same address. Errors
/// are one line for the user.
pub async fn start(
    metrics_addr: Option<std::net::SocketAddr>,
    page: Option<(std::net::SocketAddr, Arc<dyn Page>)>,
    stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let mut sites: Vec<(std::net::SocketAddr, Site, &str)> = Vec::new();
    if let Some(addr) = metrics_addr {
        sites.push((addr, Site { metrics: true, page: None }, "--metrics"));
    }
    if let Some((addr, page)) = page {
        match sites.iter_mut().find(|(a, _, _)| *a == addr) {
            Some((_, site, _)) => site.page = Some(page),
            None => sites.push((addr, Site { metrics: false, page: Some(page) }, "--http")),
        }
    }
    for (addr, site, flag) in sites {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} for {flag}: {e}; choose another address"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        tracing::info!(%local, "{flag}: serving HTTP");
        tokio::spawn(serve(listener, site, stop.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpSocket;

    /// A server for `/healthz` on a free loopback port, stopped on drop of
    /// the sender.
    async fn server() -> (std::net::SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop) = watch::channel(false);
        tokio::spawn(serve(listener, Site::default(), stop));
        (addr, stop_tx)
    }

    /// Sends `request` from `from` and returns the status code (0 when the
    /// connection was closed without an answer).
    async fn status(addr: std::net::SocketAddr, from: [u8; 4], request: &[u8]) -> u16 {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind((std::net::Ipv4Addr::from(from), 0).into()).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut reply = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut reply)).await;
        assert!(read.is_ok(), "no answer within 10 s");
        let reply = String::from_utf8_lossy(&reply);
        reply.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    #[tokio::test]
    async fn a_host_header_that_is_not_ascii_or_comes_twice_is_refused() {
        let (addr, _stop) = server().await;
        let plain = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        assert_eq!(status(addr, [127, 0, 0, 1], plain).await, 200);
        let foreign = b"GET /healthz HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n";
        assert_eq!(status(addr, [127, 0, 0, 1], foreign).await, 421);
        let non_ascii = b"GET /healthz HTTP/1.1\r\nHost: \xe9vil.example\r\nConnection: close\r\n\r\n";
        assert_eq!(status(addr, [127, 0, 0, 1], non_ascii).await, 421);
        let twice =
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\nConnection: close\r\n\r\n";
        assert_eq!(status(addr, [127, 0, 0, 1], twice).await, 421);
    }

    #[tokio::test]
    async fn slow_connections_from_elsewhere_leave_localhost_its_slots() {
        let (addr, _stop) = server().await;
        // The attack: many connections that never finish their request,
        // from five addresses, hold every slot they can get.
        let mut held = Vec::new();
        for n in 0..(MAX_CONNECTIONS + 16) {
            let socket = TcpSocket::new_v4().unwrap();
            let from = std::net::Ipv4Addr::new(127, 0, 0, 2 + (n % 5) as u8);
            socket.bind((from, 0).into()).unwrap();
            let mut stream = socket.connect(addr).await.unwrap();
            stream.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
            held.push(stream);
        }
        // Let the server take (or close) each of them.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let health = b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n";
        assert_eq!(status(addr, [127, 0, 0, 1], health).await, 200, "localhost is still answered");
        assert_eq!(status(addr, [127, 0, 0, 7], health).await, 0, "another address waits its turn");
    }
}
