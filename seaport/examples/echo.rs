//! An echo service served in this process, and a client that finds it by
//! range through a registry and talks to it:
//!
//! ```text
//! seaport-registry --listen 127.0.0.1:4500 --no-dht     # prints KEY
//! cargo run -p seaport --example echo -- KEY@127.0.0.1:4500
//! ```
//!
//! It prints what came back and the events it saw, and exits 0 only if
//! every message came back whole.

use std::error::Error;
use std::time::Duration;

use seaport::{
    Accepted, Client, ClientOptions, RegistryTarget, Role, RoleQuery, Service, ServiceOptions, Streams,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let registry: RegistryTarget =
        std::env::args().nth(1).ok_or("usage: echo REGISTRY (KEY or KEY@HOST:PORT)")?.parse()?;
    let mut events = seaport::subscribe();

    // The service: echo@1.0.0, each stream answered here.
    let role = Role::parse("echo@1.0.0")?;
    let options =
        ServiceOptions::new(registry.clone(), seaport::generate_keypair(), role, Streams::InProcess);
    let mut service = Service::start(options).await?;
    println!("service {} offers echo@1.0.0", service.key());
    // Streams are accepted in a task of their own; this one keeps the
    // service, to shut it down at the end.
    let mut incoming = service.incoming().ok_or("the service's streams are not in-process")?;
    let serving = tokio::spawn(async move {
        while let Some(stream) = incoming.accept().await {
            tokio::spawn(echo(stream));
        }
    });

    // The client: any echo@1.x, found through the registry.
    let client = Client::start(ClientOptions::new(registry, seaport::generate_keypair()))?;
    let query = RoleQuery::parse("echo@1.x")?;
    for message in ["hello", "over an encrypted link", &"x".repeat(1 << 20)] {
        let mut stream = client.connect(&query).await?;
        let service = stream.instance().key;
        // Write and read at once: a large message fills the buffers both ways.
        let (mut reader, mut writer) = tokio::io::split(&mut stream);
        let send = async {
            writer.write_all(message.as_bytes()).await?;
            writer.shutdown().await
        };
        let mut back = Vec::new();
        let (sent, read) = tokio::join!(send, reader.read_to_end(&mut back));
        sent?;
        read?;
        if back != message.as_bytes() {
            return Err(
                format!("{} bytes sent, {} different bytes came back", message.len(), back.len()).into()
            );
        }
        println!("echoed {} bytes through service {service}", back.len());
    }
    client.close().await;
    // The role is withdrawn first; streams under way get a second. The
    // accept loop ends once every link is gone.
    service.shutdown(Duration::from_secs(1)).await;
    serving.await?;

    // What happened, as values (the binaries print the same events).
    while let Ok(event) = events.try_recv() {
        println!("event: {}", event.name());
    }
    Ok(())
}

/// Sends back what the stream brings, until its end.
async fn echo(mut stream: Accepted) {
    let (mut reader, mut writer) = tokio::io::split(&mut stream);
    if tokio::io::copy(&mut reader, &mut writer).await.is_ok() {
        let _ = writer.shutdown().await;
    }
}
