//! The HTTP gateway (`--gateway ADDR`): one local HTTP/1.1 port for every
//! role, routed by path or by `Host`:
//! - `/role/<role@range>/<path>` → `<path>` on a matching instance (chosen
//!   and failed over as a `--map` port's connections are);
//! - `/instance/<key>/<path>` → `<path>` on that service (one already found
//!   through a route or a port of this proxy);
//! - `/list/<role@range>` → the matching instances as JSON;
//! - `Host: <role>.<suffix>` (with `--gateway-domain SUFFIX`) → the path as
//!   it is on an instance of `<role>` (any version).
//!
//! A route's query is the [`Client`]'s route (one slot per distinct query,
//! at most [`crate::MAX_ROUTES`], the least recently used given up first),
//! so the second request finds its instances known. Requests go to the backend
//! with hyper's HTTP/1 client over a link stream whose local end is in this
//! process ([`seaport_net::link::StreamSocket::pair`]): bodies stream both ways at any size,
//! `Upgrade` (WebSocket) becomes a byte pipe after the 101, and a
//! connection to a backend is kept (at most [`IDLE_PER_SERVICE`] per
//! service) for the next request.
//!
//! Invariants: nothing of a request is sent before a service accepted its
//! stream, so a refusing instance costs the client nothing but a retry on
//! the next; a request is never sent twice (once its body started, a
//! failure is a 502). Errors are HTTP answers with a one-line reason:
//! 400 for a bad range or key, 404 for a role nothing is registered under or
//! an unknown path, 502 when no instance answers, 504 when no registry
//! answers in time.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use seaport_net::lock::lock;
use seaport_proto::keys::PublicKey;
use seaport_proto::message::Instance;
use seaport_proto::role::{Protocol, RoleQuery};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::client::{Client, LookupError, Slot};

/// Most idle backend connections kept per service and client.
pub const IDLE_PER_SERVICE: usize = 16;
/// Most idle backend connections kept in all (each holds a link stream and
/// a backend connection at its service).
pub const IDLE_IN_ALL: usize = 256;
/// How long an idle backend connection is kept.
pub const IDLE_FOR: Duration = Duration::from_secs(30);
/// How long a client may take to send a request's head.
const HEAD_WITHIN: Duration = Duration::from_secs(30);

/// What a response carries: a backend's body, or our own answer.
type Body = Either<Returning, Full<Bytes>>;

/// Idle backend connections, per service and client address and port: a
/// backend told the client's address (PROXY protocol) once per connection
/// must not see another client's requests on it. Bounded by
/// [`IDLE_PER_SERVICE`], [`IDLE_IN_ALL`] and [`IDLE_FOR`].
#[derive(Default)]
pub(crate) struct Idle(Mutex<HashMap<IdleKey, Vec<Kept>>>);

/// An idle connection and since when.
type Kept = (SendRequest<Incoming>, Instant);

/// Whose an idle connection is: the service's and the client's.
type IdleKey = (PublicKey, SocketAddr);

impl Idle {
    /// Keeps `sender` for the next request of `key`'s client.
    fn put(&self, key: (PublicKey, SocketAddr), sender: SendRequest<Incoming>) {
        let mut idle = lock(&self.0);
        let now = Instant::now();
        let mut total = 0;
        idle.retain(|_, kept| {
            kept.retain(|(s, since)| !s.is_closed() && now.duration_since(*since) < IDLE_FOR);
            total += kept.len();
            !kept.is_empty()
        });
        let kept = idle.entry(key).or_default();
        if kept.len() < IDLE_PER_SERVICE && total < IDLE_IN_ALL {
            kept.push((sender, now));
        }
    }

    /// A kept connection for `key`'s client, if any.
    fn take(&self, key: &(PublicKey, SocketAddr)) -> Option<SendRequest<Incoming>> {
        let mut idle = lock(&self.0);
        let kept = idle.get_mut(key)?;
        let taken = kept.pop().map(|(sender, _)| sender);
        if kept.is_empty() {
            idle.remove(key);
        }
        taken
    }
}

/// A backend's response body that gives its connection back to the idle
/// ones once it has been read to the end (not before: the connection is
/// busy until then).
pub(crate) struct Returning {
    body: Incoming,
    back: Option<GoesBack>,
}

/// Where a connection goes once its response was read: `sender` into
/// `idle` under `key`.
struct GoesBack {
    idle: Arc<Idle>,
    key: (PublicKey, SocketAddr),
    sender: SendRequest<Incoming>,
}

/// Why a request goes nowhere: an HTTP status and a line for people.
struct Refusal(StatusCode, String);

impl From<Refusal> for Response<Body> {
    fn from(Refusal(status, why): Refusal) -> Response<Body> {
        text(status, why)
    }
}

impl hyper::body::Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        // hyper stops asking after the last byte of a body of known length,
        // so the end is also when no byte is left.
        let ended = matches!(polled, std::task::Poll::Ready(None)) || self.body.is_end_stream();
        if ended && let Some(GoesBack { idle, key, sender }) = self.back.take() {
            idle.put(key, sender);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The gateway's state, shared by its connections.
pub(crate) struct Gateway {
    /// Its lookups, routes and links.
    pub(crate) client: Arc<Client>,
    /// `Host` routing: `<role>.<domain>`.
    pub(crate) domain: Option<String>,
    /// Idle backend connections.
    pub(crate) idle: Arc<Idle>,
}

/// Where a request goes.
enum Route {
    /// An instance of the query, at `path`; `prefix` is what was cut off.
    Role { query: RoleQuery, prefix: String, path: String },
    /// The service `key`, at `path`.
    Instance { key: PublicKey, prefix: String, path: String },
    /// The instances of the query, as JSON.
    List(RoleQuery),
}

impl Gateway {
    /// Serves HTTP on `listener` until `stop` turns true.
    /// Serves HTTP on `listener` until `stop` turns true; returns the
    /// connections still open, which finish the requests under way (idle
    /// keep-alive ones close at once), for the proxy's drain.
    pub(crate) async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        stop: watch::Receiver<bool>,
    ) -> JoinSet<()> {
        let mut open = JoinSet::new();
        let mut stopping = stop.clone();
        let stopped = async move {
            let _ = stopping.wait_for(|stopped| *stopped).await;
        };
        tokio::pin!(stopped);
        loop {
            // Reap the finished ones: the set holds only what is open.
            while open.try_join_next().is_some() {}
            let (stream, client) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!("gateway: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut stopped => return open,
            };
            let _ = stream.set_nodelay(true);
            let gateway = self.clone();
            let mut stop = stop.clone();
            open.spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let gateway = gateway.clone();
                    async move { Ok::<_, std::convert::Infallible>(gateway.handle(request, client).await) }
                });
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder.timer(TokioTimer::new()).header_read_timeout(HEAD_WITHIN);
                let conn = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
                tokio::pin!(conn);
                let stopped = async move {
                    let _ = stop.wait_for(|stopped| *stopped).await;
                };
                let ended = tokio::select! {
                    ended = conn.as_mut() => ended,
                    () = stopped => {
                        // The request under way finishes; no other is taken.
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = ended {
                    tracing::debug!(%client, "gateway connection ended: {e}");
                }
            });
        }
    }

    async fn handle(self: Arc<Self>, request: Request<Incoming>, client: SocketAddr) -> Response<Body> {
        let route = match self.route(&request) {
            Ok(route) => route,
            Err(refusal) => return refusal.into(),
        };
        match route {
            Route::List(query) => match self.instances(&query).await {
                Ok((instances, _)) => json(&instances),
                Err(refusal) => refusal.into(),
            },
            Route::Role { query, prefix, path } => match self.instances(&query).await {
                Ok((instances, _)) if instances.is_empty() => {
                    text(StatusCode::NOT_FOUND, format!("no instance of {query} is registered"))
                }
                Ok((instances, slot)) => {
                    let order = self.client.order(slot, &instances);
                    self.forward(request, client, order, &prefix, &path).await
                }
                Err(refusal) => refusal.into(),
            },
            Route::Instance { key, prefix, path } => {
                let found: Vec<Instance> = lock(&self.client.reach.view)
                    .all_instances()
                    .into_iter()
                    .filter(|i| {
                        i.key == key
                            && self.client.reach.pinned.admits(&i.key)
                            && i.role.protocol() == Protocol::Tcp
                    })
                    .collect();
                if found.is_empty() {
                    let why = format!(
                        "service {key} is not among the instances this proxy found: \
                         reach its role through /role/ or /list/ first"
                    );
                    return text(StatusCode::NOT_FOUND, why);
                }
                self.forward(request, client, found, &prefix, &path).await
            }
        }
    }

    /// Where `request` goes, or the answer saying why nowhere.
    fn route(&self, request: &Request<Incoming>) -> Result<Route, Refusal> {
        let path = request.uri().path();
        let query_string = request.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
        let parse_query = |name: &str| {
            RoleQuery::parse(name)
                .map_err(|e| Refusal(StatusCode::BAD_REQUEST, format!("{name:?} is not a ROLE@RANGE: {e}")))
        };
        // A role's own host name is routed by host alone: each role is its
        // own browser origin, and no page of one reaches another's paths.
        if let Some(role) = self.host_role(request) {
            let path = format!("{path}{query_string}");
            return Ok(Route::Role { query: parse_query(&role)?, prefix: String::new(), path });
        }
        // Any other name is refused: a page elsewhere whose name was made to
        // resolve to this machine (DNS rebinding) reads nothing through it.
        self.check_host(request)?;
        // `/<kind>/<name>[/<rest>]`.
        let split = |kind: &str| -> Option<(String, String, String)> {
            let rest = path.strip_prefix(kind)?;
            let (name, tail) = rest.split_once('/').map_or((rest, ""), |(n, t)| (n, t));
            let prefix = format!("{kind}{name}");
            Some((percent_decode(name), prefix, format!("/{tail}{query_string}")))
        };
        if let Some((name, prefix, path)) = split("/role/") {
            return Ok(Route::Role { query: parse_query(&name)?, prefix, path });
        }
        if let Some((name, _, _)) = split("/list/") {
            return Ok(Route::List(parse_query(&name)?));
        }
        if let Some((name, prefix, path)) = split("/instance/") {
            let key = name.parse::<PublicKey>().map_err(|e| {
                Refusal(
                    StatusCode::BAD_REQUEST,
                    format!("{name:?} is not a service key (64 hex characters): {e}"),
                )
            })?;
            return Ok(Route::Instance { key, prefix, path });
        }
        let hint = match &self.domain {
            Some(domain) => format!(", or Host: ROLE.{domain}"),
            None => String::new(),
        };
        Err(Refusal(
            StatusCode::NOT_FOUND,
            format!("no route: use /role/ROLE@RANGE/PATH, /instance/KEY/PATH or /list/ROLE@RANGE{hint}"),
        ))
    }

    /// With `--gateway-domain D`, the role of a `Host: <role>.D[:port]`.
    fn host_role(&self, request: &Request<Incoming>) -> Option<String> {
        let domain = self.domain.as_deref()?;
        let role = host_name(request)?.strip_suffix(&format!(".{domain}"))?.to_owned();
        (!role.is_empty() && !role.contains('.')).then_some(role)
    }

    /// Path routes answer only to the names this gateway has: an IP
    /// address, `localhost` (and its subdomains), the `--gateway-domain`.
    fn check_host(&self, request: &Request<Incoming>) -> Result<(), Refusal> {
        let Some(host) = host_name(request) else { return Ok(()) };
        let ip = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok();
        let local = host == "localhost" || host.ends_with(".localhost");
        let ours = self.domain.as_deref().is_some_and(|d| host == d);
        if ip || local || ours {
            return Ok(());
        }
        let why = format!(
            "{host} is not a name of this gateway: use its address, localhost, or name it with --gateway-domain"
        );
        Err(Refusal(StatusCode::MISDIRECTED_REQUEST, why))
    }

    /// The instances of `query` once a registry answered (watching it from
    /// now on), or the answer saying why not.
    async fn instances(&self, query: &RoleQuery) -> Result<(Vec<Instance>, Slot), Refusal> {
        self.client.route(query).await.map_err(|e| {
            let status = match e {
                LookupError::NoAnswer { .. } => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            Refusal(status, e.to_string())
        })
    }

    /// Sends `request` to the first of `order` that takes it.
    async fn forward(
        &self,
        mut request: Request<Incoming>,
        client: SocketAddr,
        order: Vec<Instance>,
        prefix: &str,
        path: &str,
    ) -> Response<Body> {
        let upgrade = wants_upgrade(request.headers());
        let from_client = upgrade.then(|| hyper::upgrade::on(&mut request));
        if let Err(refusal) = rewrite(&mut request, client, prefix, path, upgrade) {
            return refusal.into();
        }
        let mut failures = Vec::new();
        for instance in order {
            // A kept connection first; if it turns out closed before the
            // request went out, once more on a new stream to the same instance.
            for fresh in [false, true] {
                let mut sender = match self.sender(&instance, client, fresh).await {
                    Ok(sender) => sender,
                    Err(e) => {
                        tracing::warn!(service = %instance.key, "gateway: instance failed, trying the next: {e}");
                        lock(&self.client.reach.view).report_failure(seaport_net::clock::now(), instance.key);
                        failures.push(e);
                        break;
                    }
                };
                match sender.try_send_request(request).await {
                    Ok(answer) => {
                        seaport_net::serve::record_peer_key(&instance.key);
                        return self.answer(answer, sender, (instance.key, client), from_client);
                    }
                    Err(mut e) => match e.take_message() {
                        // Not sent: nothing of it reached the backend.
                        Some(back) => {
                            request = back;
                            failures.push(format!("{}: {}", instance.key, e.into_error()));
                        }
                        None => {
                            let why = format!(
                                "service {} failed during the request: {}",
                                instance.key,
                                e.into_error()
                            );
                            return text(StatusCode::BAD_GATEWAY, why);
                        }
                    },
                }
            }
        }
        text(StatusCode::BAD_GATEWAY, format!("no instance answered: {}", failures.join("; ")))
    }

    /// The backend's answer to the client: its connection is kept once the
    /// body is read; after a 101 the two upgraded connections are joined.
    fn answer(
        &self,
        mut answer: Response<Incoming>,
        sender: SendRequest<Incoming>,
        key: (PublicKey, SocketAddr),
        from_client: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<Body> {
        if answer.status() == StatusCode::SWITCHING_PROTOCOLS {
            let to_backend = hyper::upgrade::on(&mut answer);
            if let Some(from_client) = from_client {
                tokio::spawn(async move {
                    let (Ok(client), Ok(backend)) = tokio::join!(from_client, to_backend) else { return };
                    let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
                    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut backend).await {
                        tracing::debug!("gateway: upgraded connection ended: {e}");
                    }
                });
            }
            return answer.map(|body| Either::Left(Returning { body, back: None }));
        }
        strip_hop_by_hop(answer.headers_mut());
        // A body that is already over (HEAD, 204, 304, an empty one) is
        // never read to its end by hyper: the connection is free now.
        if answer.body().is_end_stream() {
            self.idle.put(key, sender);
            return answer.map(|body| Either::Left(Returning { body, back: None }));
        }
        let back = Some(GoesBack { idle: self.idle.clone(), key, sender });
        answer.map(|body| Either::Left(Returning { body, back }))
    }

    /// A backend connection to `instance`: a kept one that is free, else a
    /// new stream on its link (the service connects its backend first).
    async fn sender(
        &self,
        instance: &Instance,
        client: SocketAddr,
        fresh: bool,
    ) -> Result<SendRequest<Incoming>, String> {
        // A kept connection was idle when put back; it takes a request
        // once its connection task has noticed (a moment at most).
        while let Some(mut sender) = self.idle.take(&(instance.key, client)).filter(|_| !fresh) {
            // Usually ready already: no timer for that case.
            if sender.is_ready() {
                return Ok(sender);
            }
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(1), sender.ready()).await {
                return Ok(sender);
            }
        }
        let theirs = self.client.open(instance, Some(client)).await?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(theirs)).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("gateway: backend connection ended: {e}");
            }
        });
        Ok(sender)
    }
}

/// The request's `Host` without its port, in lower case.
fn host_name(request: &Request<Incoming>) -> Option<String> {
    let host = request.headers().get(header::HOST)?.to_str().ok()?;
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.parse::<u16>().is_ok() && !name.ends_with(':') => name,
        _ => host,
    };
    Some(host.to_ascii_lowercase())
}

/// Whether a request asks to switch protocols (`Connection: upgrade`).
fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// Readies `request` for the backend: its path with the route cut off,
/// hop-by-hop headers dropped (but an upgrade's kept), and who asked
/// (`X-Forwarded-*`, `Forwarded`).
fn rewrite(
    request: &mut Request<Incoming>,
    client: SocketAddr,
    prefix: &str,
    path: &str,
    upgrade: bool,
) -> Result<(), Refusal> {
    *request.uri_mut() = path
        .parse::<Uri>()
        .map_err(|e| Refusal(StatusCode::BAD_REQUEST, format!("{path:?} is not a path: {e}")))?;
    let headers = request.headers_mut();
    // Headers named by Connection are for this hop only (RFC 9110 7.6.1).
    // What frames the message (Host, the body's length) is never dropped.
    let named: Vec<HeaderName> = connection_named(headers)
        .into_iter()
        .filter(|name| !(upgrade && name == header::UPGRADE))
        .filter(|name| ![header::HOST, header::CONTENT_LENGTH, header::TRANSFER_ENCODING].contains(name))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection", "te", "trailer", "proxy-authorization"] {
        headers.remove(name);
    }
    // Ours alone: a client's own would be taken for the gateway's word.
    for name in ["x-forwarded-proto", "x-forwarded-host", "x-forwarded-prefix", "forwarded"] {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
    }
    let ip = client.ip().to_string();
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(before) => format!("{before}, {ip}"),
        None => ip.clone(),
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let node = if client.is_ipv6() { format!("\"[{ip}]\"") } else { ip };
    let mut forwarded = format!("for={node};proto=http");
    // Only a plain authority goes in: no quote, comma or semicolon that
    // would end the value and start another.
    if !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b)) {
        forwarded.push_str(&format!(";host=\"{host}\""));
    }
    let values = [
        ("x-forwarded-for", forwarded_for),
        ("x-forwarded-proto", "http".to_owned()),
        ("x-forwarded-host", host),
        ("x-forwarded-prefix", prefix.to_owned()),
        ("forwarded", forwarded),
    ];
    for (name, value) in values {
        if value.is_empty() {
            continue;
        }
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    Ok(())
}

/// The header names a `Connection` header lists (hop-by-hop, RFC 9110 7.6.1).
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()).collect::<Vec<_>>())
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect()
}

/// Drops a backend response's hop-by-hop headers: the gateway's own
/// connection to its client has its own.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in connection_named(headers) {
        if ![header::CONTENT_LENGTH, header::TRANSFER_ENCODING].contains(&name) {
            headers.remove(name);
        }
    }
    for name in [header::CONNECTION, header::UPGRADE, header::TE, header::TRAILER, header::PROXY_AUTHENTICATE]
    {
        headers.remove(name);
    }
    headers.remove("keep-alive");
}

/// `%XX` escapes decoded (a range such as `^3.2.0` or `1.x || 2.x` arrives
/// escaped); anything else is kept as it is.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (b, hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(decoded)) => {
                out.push(decoded);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A plain-text answer.
fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut answer = Response::new(Either::Right(Full::new(Bytes::from(body + "\n"))));
    *answer.status_mut() = status;
    answer.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    answer
}

/// The instances as a JSON array of `{key, role, addrs}`.
fn json(instances: &[Instance]) -> Response<Body> {
    let list: Vec<serde_json::Value> = instances
        .iter()
        .map(|i| {
            serde_json::json!({
                "key": i.key.to_string(),
                "role": i.role.to_string(),
                "addrs": i.addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })
        })
        .collect();
    let body = serde_json::Value::Array(list).to_string();
    let mut answer = Response::new(Either::Right(Full::new(Bytes::from(body))));
    answer.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_ranges_are_read_as_written() {
        assert_eq!(percent_decode("web@%5E1.2.0"), "web@^1.2.0");
        assert_eq!(percent_decode("web@1.x%20%7C%7C%202.x"), "web@1.x || 2.x");
        assert_eq!(percent_decode("bad%zz%4"), "bad%zz%4");
    }

    #[test]
    fn an_upgrade_is_asked_with_both_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!wants_upgrade(&headers));
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(wants_upgrade(&headers));
    }
}
