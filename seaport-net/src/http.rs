//! The operations HTTP server: `/metrics`, `/ready` and `/healthz` for
//! `--metrics`, and the registry's page (`/`, `/api/instances`) for
//! `--http`, over a minimal HTTP/1 server (hyper).
//!
//! Read-only: every route answers GET (and HEAD) from state the process
//! already keeps; no request changes anything, and no request body is
//! read. Bounds: at most [`MAX_CONNECTIONS`] connections at once (more are
//! closed at once), request headers must arrive within [`HEADER_TIMEOUT`],
//! and a connection lives at most [`CONNECTION_LIFETIME`] (a page polling
//! over keep-alive simply opens another).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::limit::{Limit, Over};
use crate::metrics::{metrics, readiness};

/// Most HTTP connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Most of them from one address, so that one client cannot lock the
/// health checks out.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 16;
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
    let slots = Limit::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_SOURCE);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else {
                    // Out of file descriptors and the like: pause rather than spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let permit = match slots.take(peer.ip()) {
                    Ok(permit) => permit,
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
/// (with or without a port). A browser sends the page's own host name, so a
/// hostile page that rebinds its name to this address is refused, while
/// curl, Prometheus and a browser pointed at `127.0.0.1:PORT` all pass.
fn plain_host(request: &Request<Incoming>) -> bool {
    let Some(host) = request.headers().get(hyper::header::HOST).and_then(|h| h.to_str().ok()) else {
        // HTTP/1.0 without Host: not what a browser sends.
        return true;
    };
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
