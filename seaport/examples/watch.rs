//! Watches a version range and prints its instances each time they change:
//!
//! ```text
//! cargo run -p seaport --example watch -- REGISTRY couchdb@3.x
//! ```
//!
//! One line per change: the number of instances, then one line each with
//! its key and role. Runs until Ctrl-C.

use std::error::Error;

use seaport::{Client, ClientOptions, RegistryTarget, RoleQuery};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: watch REGISTRY ROLE@RANGE";
    let registry: RegistryTarget = args.next().ok_or(usage)?.parse()?;
    let query = RoleQuery::parse(&args.next().ok_or(usage)?)?;
    let client = Client::start(ClientOptions::new(registry, seaport::generate_keypair()))?;
    let mut watch = client.watch(&query)?;
    loop {
        let changed = tokio::select! {
            changed = watch.changed() => changed,
            _ = tokio::signal::ctrl_c() => break,
        };
        let instances = match changed {
            Ok(instances) => instances,
            // Asked again after the registry's next reconnect.
            Err(seaport::LookupError::Refused { why, .. }) => {
                eprintln!("the registry refused {query}: {why}");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        println!("{query}: {} instances", instances.len());
        for instance in &instances {
            println!("  {} {}", instance.key, instance.role);
        }
    }
    drop(watch);
    client.close().await;
    Ok(())
}
