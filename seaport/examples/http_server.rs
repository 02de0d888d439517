//! A hyper HTTP server registered as a role: its connections are the
//! streams proxies open, served in this process (no TCP port of its own).
//!
//! ```text
//! cargo run -p seaport --example http_server -- REGISTRY [ROLE@VERSION]
//! seaport-proxy REGISTRY -p 8080 -r web@1.x     # anywhere
//! curl http://127.0.0.1:8080/hello
//! ```
//!
//! Runs until Ctrl-C (or SIGTERM), then withdraws the role and lets
//! requests under way finish.

use std::convert::Infallible;
use std::error::Error;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use seaport::{Accepted, Event, RegistryTarget, Role, Service, ServiceOptions, Streams};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let registry: RegistryTarget =
        args.next().ok_or("usage: http_server REGISTRY [ROLE@VERSION]")?.parse()?;
    let role = Role::parse(&args.next().unwrap_or_else(|| "web@1.0.0".to_owned()))?;
    let mut events = seaport::subscribe();
    let options =
        ServiceOptions::new(registry, seaport::generate_keypair(), role.clone(), Streams::InProcess);
    let mut service = Service::start(options).await?;
    println!("service {} offers {role}", service.key());
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = service.accept() => match accepted {
                Some(stream) => { tokio::spawn(serve(stream, role.clone())); }
                None => break,
            },
            Ok(event) = events.recv() => if let Event::Registered { role } = event {
                println!("registered {role}");
            },
            () = &mut stop => break,
        }
    }
    service.shutdown(Duration::from_secs(5)).await;
    println!("stopped");
    Ok(())
}

/// One proxy stream: an HTTP/1.1 connection, keep-alive and all.
async fn serve(stream: Accepted, role: Role) {
    let client = stream.client();
    let answer = move |request: Request<hyper::body::Incoming>| {
        let role = role.clone();
        async move {
            let from = client.map_or_else(|| "somewhere".to_owned(), |a| a.to_string());
            let body = format!("{role} answers {} {} for {from}\n", request.method(), request.uri().path());
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
        }
    };
    let connection = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), hyper::service::service_fn(answer));
    if let Err(e) = connection.await {
        eprintln!("connection ended: {e}");
    }
}

/// Ctrl-C or SIGTERM.
async fn stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
