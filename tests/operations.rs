//! Operations with the real binaries: `/metrics` scraped after real traffic
//! (counters match what the test did), `/ready` following the registry
//! away and back, `/healthz`, the registry's `/api/instances`, and its
//! live page in a real headless Chromium over WebDriver.
//!
//! The browser test needs Debian's `chromium` and `chromium-driver`; where
//! they are missing it says so and passes, unless `SEAPORT_BROWSER=require`
//! (CI), where it fails.

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use std::thread;
use std::time::{Duration, Instant};

use seaport_tests::*;
use serde_json::Value;

#[path = "browser.rs"]
mod browser;

const WAIT: Duration = Duration::from_secs(20);

/// `http://127.0.0.1:PORT` for `--metrics`/`--http`.
fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// Waits until `GET path` answers `status`; returns the body.
fn wait_status(port: u16, path: &str, status: u16, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (got, body) = http_get_path(port, path);
        if got == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} answered {got} ({body:?}), not {status}, within {timeout:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn metrics_count_what_went_through() {
    const REQUESTS: usize = 5;
    let body = "hello from web 1.2.3";
    let backend = http_backend(body);
    let (reg_m, svc_m, proxy_m) = (free_port(), free_port(), free_port());
    let reg = registry(&["--metrics", &addr(reg_m)]);
    let svc = service_with(&reg.target, backend, "web@1.2.3", &["--metrics", &addr(svc_m)]);
    let (proxy, port) = proxy_with(&reg.target, "web@1.x", 1, &["--metrics", &addr(proxy_m)]);
    for _ in 0..REQUESTS {
        assert_eq!(http_get(port), (200, body.to_owned()));
    }
    let n = REQUESTS as f64;

    let p = scrape_until(proxy_m, "proxy streams", |s| {
        s.get("seaport_streams_opened_total{result=\"accepted\"}") == Some(&n)
            && s.get("seaport_streams") == Some(&0.0)
    });
    assert_eq!(sample(&p, "seaport_stream_open_seconds_count"), n);
    assert!(sample(&p, "seaport_stream_open_seconds_sum") > 0.0);
    assert_eq!(sample(&p, "seaport_stream_open_seconds_bucket{le=\"+Inf\"}"), n);
    assert_eq!(sample(&p, "seaport_links_total{path=\"direct\"}"), 1.0);
    assert_eq!(sample(&p, "seaport_links_open"), 1.0);
    assert_eq!(sample(&p, "seaport_handshakes_total{result=\"ok\"}"), 1.0);
    assert_eq!(sample(&p, "seaport_instances"), 1.0);
    assert_eq!(sample(&p, "seaport_instance_changes_total{change=\"found\"}"), 1.0);
    // Each reply is the backend's status line and headers plus the body.
    let reply = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()).len() as f64;
    assert_eq!(sample(&p, "seaport_stream_bytes_total{direction=\"received\"}"), n * reply);
    let request = "GET / HTTP/1.0\r\nHost: localhost\r\n\r\n".len() as f64;
    assert_eq!(sample(&p, "seaport_stream_bytes_total{direction=\"sent\"}"), n * request);

    let s = scrape_until(svc_m, "service streams", |s| {
        s.get("seaport_streams_opened_total{result=\"accepted\"}") == Some(&n)
    });
    assert_eq!(sample(&s, "seaport_registrations_total{event=\"registered\"}"), 1.0);
    assert_eq!(sample(&s, "seaport_handshakes_total{result=\"ok\"}"), 1.0);
    // The service's sent is the proxy's received, and the other way round.
    assert_eq!(sample(&s, "seaport_stream_bytes_total{direction=\"sent\"}"), n * reply);
    assert_eq!(sample(&s, "seaport_stream_bytes_total{direction=\"received\"}"), n * request);

    let r = scrape_until(reg_m, "registry gauges", |s| s.get("seaport_watches") == Some(&1.0));
    assert_eq!(sample(&r, "seaport_sessions"), 2.0);
    assert_eq!(sample(&r, "seaport_sessions_opened_total"), 2.0);
    assert_eq!(sample(&r, "seaport_instances"), 1.0);
    assert_eq!(sample(&r, "seaport_registrations_total{event=\"registered\"}"), 1.0);
    assert_eq!(sample(&r, "seaport_handshakes_total{result=\"ok\"}"), 2.0);
    assert!(sample(&r, "seaport_lookups_total") >= 1.0);
    assert_eq!(sample(&r, "seaport_relays_opened_total"), 0.0);

    // /healthz and /ready on every binary; unknown paths are 404, writes 405.
    for port in [reg_m, svc_m, proxy_m] {
        assert_eq!(http_get_path(port, "/healthz"), (200, "ok\n".to_owned()));
        assert_eq!(http_get_path(port, "/ready"), (200, "ready\n".to_owned()));
        assert_eq!(http_get_path(port, "/nothing").0, 404);
    }
    // --metrics alone serves no page.
    assert_eq!(http_get_path(reg_m, "/api/instances").0, 404);
    drop((svc, proxy));
}

#[test]
fn ready_follows_the_registry_away_and_back() {
    let backend = http_backend("up");
    let (seed, key) = new_seed();
    let listen = addr(free_port());
    let target = format!("{key}@{listen}");
    let start_registry = || {
        let reg = Proc::start(
            "seaport-registry",
            &["--listen", &listen, "--no-dht"],
            &[("SEAPORT_REGISTRY_SEED", &seed)],
        );
        reg.wait_line("Registry listening", WAIT);
        reg
    };
    let reg = start_registry();
    let (svc_m, proxy_m, lonely_m) = (free_port(), free_port(), free_port());
    let svc = service_with(&target, backend, "web@1.2.3", &["--metrics", &addr(svc_m)]);
    let (proxy, _) = proxy_with(&target, "web@1.x", 1, &["--metrics", &addr(proxy_m)]);
    // A proxy that serves a role nobody offers, beside one that is offered,
    // is alive but not ready.
    let (lonely, _) = proxy_with(&target, "web@1.x", 1, &["--map", "db@2.x=0", "--metrics", &addr(lonely_m)]);
    lonely.wait_line("connected to registry", WAIT);
    assert_eq!(http_get_path(lonely_m, "/healthz"), (200, "ok\n".to_owned()));
    let (status, reason) = http_get_path(lonely_m, "/ready");
    assert_eq!((status, reason.as_str()), (503, "no instance of db@2.x known\n"));
    assert_eq!(http_get_path(svc_m, "/ready"), (200, "ready\n".to_owned()));

    drop(reg);
    let reason = wait_status(svc_m, "/ready", 503, Duration::from_secs(5));
    assert!(reason.starts_with("not registered") && reason.ends_with('\n'), "{reason:?}");
    assert_eq!(reason.lines().count(), 1, "one line: {reason:?}");
    assert_eq!(http_get_path(svc_m, "/healthz"), (200, "ok\n".to_owned()));
    // The proxy keeps serving the instance it knows.
    assert_eq!(http_get_path(proxy_m, "/ready").0, 200);

    let started = Instant::now();
    let _reg = start_registry();
    wait_status(svc_m, "/ready", 200, Duration::from_secs(8));
    eprintln!("ready again {:?} after the registry's return", started.elapsed());
    let s = scrape(svc_m);
    assert_eq!(sample(&s, "seaport_registrations_total{event=\"registered\"}"), 2.0);
    assert_eq!(sample(&s, "seaport_registry_disconnects_total"), 1.0);
    drop((svc, proxy));
}

#[test]
fn a_full_registry_is_not_ready_and_counts_its_refusals() {
    let web = free_port();
    let reg = registry(&["--max-sessions", "1", "--metrics", &addr(web)]);
    let backend = http_backend("up");
    let first = service(&reg.target, backend, "web@1.2.3");
    assert_eq!(http_get_path(web, "/ready"), (200, "ready\n".to_owned()));
    // A second service finds the registry full, and keeps asking.
    let port = backend.to_string();
    let second = Proc::start("seaport-service", &[&reg.target, "-p", &port, "-r", "web@1.2.4"], &[]);
    let reason = wait_status(web, "/ready", 503, Duration::from_secs(5));
    assert_eq!(reason, "registry is at its limit of 1 sessions (--max-sessions): refusing new ones\n");
    let r = scrape_until(web, "a refusal", |s| {
        s.get("seaport_refusals_total{reason=\"sessions_full\"}") >= Some(&1.0)
    });
    assert_eq!(sample(&r, "seaport_sessions"), 1.0);
    assert_eq!(sample(&r, "seaport_instances"), 1.0);
    // With both gone the registry has room again.
    drop((first, second));
    wait_status(web, "/ready", 200, Duration::from_secs(5));
}

#[test]
fn api_instances_lists_roles_instances_and_sessions() {
    let (seed, key) = new_seed();
    let listen = addr(free_port());
    let target = format!("{key}@{listen}");
    let web = free_port();
    // --metrics and --http on one address: one listener serves both.
    let reg = Proc::start(
        "seaport-registry",
        &["--listen", &listen, "--no-dht", "--metrics", &addr(web), "--http", &addr(web)],
        &[("SEAPORT_REGISTRY_SEED", &seed)],
    );
    reg.wait_line("Registry listening", WAIT);
    let a = service_with(&target, http_backend("a"), "couchdb@3.2.2", &["--tag", "eu", "--tag", "ssd"]);
    let b = service_with(&target, http_backend("b"), "redis@7.2.0", &[]);
    let key_of = |p: &Proc| p.lines()[0].rsplit(' ').next().unwrap().to_owned();
    let (a_key, b_key) = (key_of(&a), key_of(&b));

    let api = || -> Value {
        let (status, body) = http_get_path(web, "/api/instances");
        assert_eq!(status, 200, "{body}");
        assert!(!body.contains(&seed), "the seed must never show");
        serde_json::from_str(&body).unwrap()
    };
    let until = |what: &str, check: &dyn Fn(&Value) -> bool| -> Value {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let json = api();
            if check(&json) {
                return json;
            }
            assert!(Instant::now() < deadline, "{what} not within 2 s: {json:#}");
            thread::sleep(Duration::from_millis(50));
        }
    };
    let json = until("two roles", &|j| j["roles"].as_array().is_some_and(|r| r.len() == 2));
    assert_eq!(json["registry"], key);
    assert!(json["uptime_seconds"].as_u64().is_some());
    assert_eq!(json["roles"][0]["name"], "couchdb");
    let couch = &json["roles"][0]["instances"][0];
    assert_eq!(couch["key"], a_key);
    assert_eq!(couch["role"], "couchdb@3.2.2");
    assert_eq!(couch["version"], "3.2.2");
    assert_eq!(couch["tags"], serde_json::json!(["eu", "ssd"]));
    assert!(couch["addrs"].as_array().is_some_and(|a| !a.is_empty()));
    assert!(couch["connected_since"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(json["roles"][1]["name"], "redis");
    assert_eq!(json["roles"][1]["instances"][0]["key"], b_key);
    let sessions = json["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2);
    assert!(sessions.iter().all(|s| s["registrations"] == 1 && s["watches"] == 0));
    assert_eq!(json["relays"]["open"], 0);
    // The page is there too, self-contained, on the same listener as /metrics.
    let (status, page) = http_get_path(web, "/");
    assert_eq!(status, 200);
    assert!(page.contains("/api/instances") && !page.contains("src=\"http") && !page.contains("href=\"http"));
    assert_eq!(scrape(web).get("seaport_instances"), Some(&2.0));

    drop(a);
    let json = until("couchdb gone", &|j| j["roles"].as_array().is_some_and(|r| r.len() == 1));
    assert_eq!(json["roles"][0]["instances"][0]["key"], b_key);
    assert_eq!(json["sessions"].as_array().unwrap().len(), 1);
    drop(b);
}

/// Waits (at most 5 s) until the page's text passes `check`; returns it.
async fn wait_text(browser: &fantoccini::Client, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = browser.execute("return document.body.innerText;", vec![]).await.unwrap();
        let text = text.as_str().unwrap_or_default().to_owned();
        if check(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "page: {what} not within 5 s:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn registry_page_updates_itself_in_a_real_browser() {
    if let Some(why) = browser::browser_missing() {
        eprintln!("skipping the browser test: {why}");
        return;
    }
    let (seed, key) = new_seed();
    let listen = addr(free_port());
    let target = format!("{key}@{listen}");
    let web = free_port();
    let reg = Proc::start(
        "seaport-registry",
        &["--listen", &listen, "--no-dht", "--http", &addr(web)],
        &[("SEAPORT_REGISTRY_SEED", &seed)],
    );
    reg.wait_line("Registry listening", WAIT);

    browser::with_chromium(&[], async |browser| {
        let run = async {
            browser.goto(&format!("http://{}/", addr(web))).await.unwrap();
            browser.execute("window.marker = 1;", vec![]).await.unwrap();
            wait_text(browser, "the registry's key", |b| b.contains(&key)).await;

            // Services start while the page is open: it shows them by itself.
            let a =
                service_with(&target, http_backend("a"), "couchdb@3.2.2", &["--tag", "eu", "--tag", "ssd"]);
            let b = service_with(&target, http_backend("b"), "redis@7.2.0", &["--tag", "cache"]);
            let key_of = |p: &Proc| p.lines()[0].rsplit(' ').next().unwrap().to_owned();
            let (a_key, b_key) = (key_of(&a), key_of(&b));
            // A proxy watching couchdb shows as a session with a watch.
            let (proxy, _) = proxy(&target, "couchdb@3.x", 1);
            let registered = Instant::now();
            wait_text(browser, "both services", |t| t.contains(&a_key) && t.contains(&b_key)).await;
            wait_text(browser, "three sessions", |t| t.contains("3 sessions")).await;
            eprintln!("services shown {:?} after they registered", registered.elapsed());
            let png = browser.screenshot().await.unwrap();
            assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "a real screenshot");
            if let Some(path) = std::env::var_os("SEAPORT_SCREENSHOT") {
                std::fs::write(&path, &png).unwrap();
            }

            // A service that dies leaves the page, without a reload.
            drop(a);
            wait_text(browser, "couchdb gone", |t| !t.contains(&a_key) && t.contains(&b_key)).await;
            // One instance is one instance, not "1 instances".
            wait_text(browser, "one instance, in the singular", |t| {
                t.contains("1 instance") && !t.contains("1 instances")
            })
            .await;
            let marker = browser.execute("return window.marker;", vec![]).await.unwrap();
            assert_eq!(marker, serde_json::json!(1), "the page reloaded: the marker is gone");
            drop((b, proxy));
        };
        run.await;
    });
}
