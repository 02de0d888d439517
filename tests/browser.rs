//! A real browser for the end-to-end tests: headless Chromium driven over
//! WebDriver (Debian's `chromium` and `chromium-driver`), included by the
//! tests that need one (`#[path = "browser.rs"] mod browser;`).

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use seaport_tests::{Proc, free_port};

/// Whether a browser test can run here: `Some(reason)` to skip (a failure
/// where `SEAPORT_BROWSER=require`, as in CI).
pub fn browser_missing() -> Option<String> {
    let missing: Vec<&str> = ["/usr/bin/chromium", "/usr/bin/chromedriver"]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return None;
    }
    let why = format!("{} missing (apt-get install chromium chromium-driver)", missing.join(" and "));
    assert!(std::env::var("SEAPORT_BROWSER").as_deref() != Ok("require"), "SEAPORT_BROWSER=require: {why}");
    Some(why)
}

/// Runs `run` with a fresh headless Chromium (`extra` added to its
/// arguments), and closes it after.
pub fn with_chromium(extra: &[String], run: impl AsyncFnOnce(&fantoccini::Client)) {
    let driver_port = free_port();
    let mut cmd = Command::new("/usr/bin/chromedriver");
    cmd.arg(format!("--port={driver_port}"));
    let _driver = Proc::spawn("chromedriver", cmd);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", driver_port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        thread::sleep(Duration::from_millis(50));
    }
    let profile = std::env::temp_dir().join(format!("seaport-chromium-{}-{driver_port}", std::process::id()));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1100,900",
        ]
        .map(String::from)
        .to_vec();
        args.push(format!("--user-data-dir={}", profile.display()));
        args.extend_from_slice(extra);
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({ "binary": "/usr/bin/chromium", "args": args }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let browser = fantoccini::ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{driver_port}"))
            .await
            .expect("a WebDriver session with chromium");
        run(&browser).await;
        browser.close().await.unwrap();
    });
    let _ = std::fs::remove_dir_all(&profile);
}
