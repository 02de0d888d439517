//! The library's API (the `seaport` crate) in this test's own process,
//! against a real registry process on loopback: what the examples do not
//! show. A stream handed to the program carries the proxy's proved key and
//! resets the client's end when dropped unshut; a program that does not
//! accept has at most `ACCEPT_QUEUE` streams queued, and the next is
//! refused (its client fails over, here to nothing); watches are capped
//! and end when their client closes.

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use std::time::Duration;

use seaport::{
    ACCEPT_QUEUE, Client, ClientOptions, LookupError, MAX_WATCHES, RegistryTarget, Role, RoleQuery, Service,
    ServiceOptions, Streams,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);

fn target(registry: &seaport_tests::Registry) -> RegistryTarget {
    registry.target.parse().unwrap()
}

async fn in_process_service(registry: &RegistryTarget, role: &str) -> Service {
    let role = Role::parse(role).unwrap();
    let options =
        ServiceOptions::new(registry.clone(), seaport::generate_keypair(), role, Streams::InProcess);
    Service::start(options).await.unwrap()
}

#[tokio::test]
async fn a_stream_carries_the_proxys_key_and_dropping_it_unshut_resets_the_client() {
    let registry = seaport_tests::registry(&[]);
    let target = target(&registry);
    let mut service = in_process_service(&target, "kv@1.0.0").await;
    let client = Client::start(ClientOptions::new(target, seaport::generate_keypair())).unwrap();
    let query = RoleQuery::parse("kv@1").unwrap();
    let mut stream = tokio::time::timeout(WAIT, client.connect(&query)).await.unwrap().unwrap();
    assert_eq!(stream.instance().key, service.key());
    stream.write_all(b"ping").await.unwrap();
    let mut accepted = tokio::time::timeout(WAIT, service.accept()).await.unwrap().unwrap();
    assert_eq!(accepted.proxy(), client.key());
    let mut ping = [0; 4];
    accepted.read_exact(&mut ping).await.unwrap();
    assert_eq!(&ping, b"ping");
    // Dropped without shutdown: an abort, which the client sees as one.
    drop(accepted);
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await.unwrap();
    assert!(read.is_err(), "a dropped stream read as a clean end: {read:?}");
    client.close().await;
    service.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_program_that_does_not_accept_holds_at_most_the_queue_and_the_next_stream_is_refused() {
    let registry = seaport_tests::registry(&[]);
    let target = target(&registry);
    let service = in_process_service(&target, "slow@1.0.0").await;
    let mut options = ClientOptions::new(target, seaport::generate_keypair());
    // A refused instance is not avoided for the next stream.
    options.ban = Duration::ZERO;
    let client = Client::start(options).unwrap();
    let query = RoleQuery::parse("slow@1").unwrap();
    let mut open = Vec::new();
    for _ in 0..ACCEPT_QUEUE {
        open.push(tokio::time::timeout(WAIT, client.connect(&query)).await.unwrap().unwrap());
    }
    let refused = tokio::time::timeout(WAIT, client.connect(&query)).await.unwrap();
    match refused {
        Err(LookupError::Unreachable(why)) => assert!(why.contains("refused"), "{why}"),
        other => panic!("stream {} of a full queue: {other:?}", ACCEPT_QUEUE + 1),
    }
    // One taken from the queue makes room for one more.
    let mut service = service;
    let _first = service.accept().await.unwrap();
    open.push(tokio::time::timeout(WAIT, client.connect(&query)).await.unwrap().unwrap());
    client.close().await;
}

#[tokio::test]
async fn watches_are_capped_and_end_when_their_client_closes() {
    let registry = seaport_tests::registry(&[]);
    let target = target(&registry);
    let client = Client::start(ClientOptions::new(target.clone(), seaport::generate_keypair())).unwrap();
    let mut watches = Vec::new();
    for n in 0..MAX_WATCHES {
        watches.push(client.watch(&RoleQuery::parse(&format!("role{n}@1")).unwrap()).unwrap());
    }
    let over = client.watch(&RoleQuery::parse("one-more@1").unwrap());
    assert!(matches!(over, Err(LookupError::Busy)), "{over:?}");
    // A dropped watch gives its place back.
    drop(watches.pop());
    let mut watch = client.watch(&RoleQuery::parse("db@2.x").unwrap()).unwrap();
    // First the registry's answer (none), then the service as it comes.
    assert_eq!(tokio::time::timeout(WAIT, watch.changed()).await.unwrap().unwrap(), vec![]);
    let service = in_process_service(&target, "db@2.3.0").await;
    let found = tokio::time::timeout(WAIT, watch.changed()).await.unwrap().unwrap();
    assert_eq!(found.iter().map(|i| i.key).collect::<Vec<_>>(), vec![service.key()]);
    client.close().await;
    let ended = tokio::time::timeout(WAIT, watch.changed()).await.unwrap();
    assert_eq!(ended, Err(LookupError::Closed));
    assert!(matches!(client.connect(&RoleQuery::parse("db@2").unwrap()).await, Err(LookupError::Closed)));
    drop(service);
}
