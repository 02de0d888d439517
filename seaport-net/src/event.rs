//! The events a binary reports on stdout: one type for all four binaries,
//! whose `Display` is the command-line contract (one line per event, stable:
//! scripts read them). Logs, with their detail, go to stderr through
//! `tracing`; stdout carries only these lines.
//!
//! Invariant: every state change a script would act on has a variant here, and
//! nothing in the registry, service or proxy prints to stdout except [`emit`].

use std::fmt;

use seaport_proto::keys::PublicKey;
use seaport_proto::role::{Role, RoleQuery};

/// One thing that happened, as a script sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The registry accepts sessions.
    RegistryListening {
        /// Its public key, the name clients use.
        key: PublicKey,
    },
    /// A service's identity is known and its link port is open.
    ServiceStarted {
        /// The service's public key.
        key: PublicKey,
    },
    /// A service or proxy starts looking for its registry.
    Connecting {
        /// The registry's key.
        registry: PublicKey,
    },
    /// The control session to the registry is open.
    Connected,
    /// The control session ended; the client reconnects by itself.
    Disconnected {
        /// Why, for people.
        reason: String,
    },
    /// The registry confirmed a service's role.
    Registered {
        /// The role.
        role: Role,
    },
    /// A service withdrew its role (its backend is down); it registers again
    /// when the backend is back.
    Withdrawn {
        /// The role.
        role: Role,
        /// Why, for people.
        reason: String,
    },
    /// The registry refused a service's role; the service keeps its session
    /// and asks again after its next reconnect.
    RegistrationRefused {
        /// The role.
        role: Role,
        /// The registry's reason.
        text: String,
    },
    /// The registry refused a proxy's watch; the proxy keeps its session and
    /// asks again after its next reconnect.
    WatchRefused {
        /// The query.
        query: RoleQuery,
        /// The registry's reason.
        text: String,
    },
    /// A proxy learned of an instance.
    Found {
        /// The instance's key.
        key: PublicKey,
        /// Its role, with its tags.
        role: Role,
    },
    /// A proxy serves a newly found instance on its port.
    Serving {
        /// The proxy's local port.
        port: u16,
        /// The instance's key.
        key: PublicKey,
    },
    /// An instance left the registry (it stopped, died, or withdrew).
    Lost {
        /// The instance's key.
        key: PublicKey,
        /// Its role.
        role: Role,
    },
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::RegistryListening { key } => write!(f, "Registry listening. Connect with pubkey {key}"),
            Event::ServiceStarted { key } => write!(f, "started p2p service on {key}"),
            Event::Connecting { registry } => write!(f, "connecting to registry {registry}"),
            Event::Connected => f.write_str("connected to registry"),
            Event::Disconnected { reason } => write!(f, "disconnected from registry: {reason}"),
            Event::Registered { role } => write!(f, "registered service {role}"),
            Event::Withdrawn { role, reason } => write!(f, "withdrew service {role}: {reason}"),
            Event::RegistrationRefused { role, text } => write!(f, "registry refused service {role}: {text}"),
            Event::WatchRefused { query, text } => write!(f, "registry refused lookup {query}: {text}"),
            Event::Found { key, role } => {
                write!(f, "found service {key} {role}")?;
                if !role.tags().is_empty() {
                    write!(f, " tags={}", role.tags().join(","))?;
                }
                Ok(())
            }
            Event::Serving { port, key } => write!(f, "proxy from {port} to p2p service {key}"),
            Event::Lost { key, role } => write!(f, "lost service {key} {role}"),
        }
    }
}

/// Prints `event` as one line on stdout. Scripts read these, so each is
/// flushed at once (Rust's stdout is line-buffered).
pub fn emit(event: &Event) {
    println!("{event}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use seaport_proto::keys::{Keypair, Seed};

    #[test]
    fn lines_keep_the_contract() {
        let key = Keypair::from_seed(&Seed::from_bytes([7; 32])).public();
        let role = Role::parse("couchdb@3.2.2").unwrap();
        assert_eq!(Event::Registered { role: role.clone() }.to_string(), "registered service couchdb@3.2.2");
        assert_eq!(
            Event::Found { key, role: role.clone() }.to_string(),
            format!("found service {key} couchdb@3.2.2")
        );
        let tagged = role.clone().with_tags(["eu", "ssd"]).unwrap();
        assert_eq!(
            Event::Found { key, role: tagged }.to_string(),
            format!("found service {key} couchdb@3.2.2 tags=eu,ssd")
        );
        assert_eq!(
            Event::Serving { port: 6000, key }.to_string(),
            format!("proxy from 6000 to p2p service {key}")
        );
        assert_eq!(Event::Lost { key, role }.to_string(), format!("lost service {key} couchdb@3.2.2"));
    }
}
