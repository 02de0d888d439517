//! `seaport-seed`: makes a random seed and prints it with the public key it
//! gives, as text for people or `--json` for scripts.

use clap::Parser;
use seaport_proto::keys::{Keypair, Seed};

/// Make a random seed for a registry (or a service or proxy that wants a
/// stable identity), and print the public key others connect with.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Start a registry with the seed: seaport-registry --seed-file FILE (or env SEAPORT_REGISTRY_SEED), and give the pubkey to services and proxies."
)]
pub struct Args {
    /// Print {"seed": ..., "pubkey": ...} instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The lines to print for `seed`.
pub fn render(seed: &Seed, json: bool) -> String {
    let pubkey = Keypair::from_seed(seed).public();
    if json {
        format!("{{\"seed\": \"{}\", \"pubkey\": \"{pubkey}\"}}", seed.to_hex())
    } else {
        format!(
            "Generated a random seed for you!\n--seed {}\nservices and proxies will connect with pubkey {pubkey}",
            seed.to_hex()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_json_name_the_same_key() {
        let seed = Seed::from_bytes([3; 32]);
        let key = Keypair::from_seed(&seed).public().to_string();
        let text = render(&seed, false);
        assert_eq!(text.lines().count(), 3);
        assert!(text.lines().nth(1).is_some_and(|l| l == format!("--seed {}", "03".repeat(32))));
        assert!(text.ends_with(&format!("pubkey {key}")));
        let json = render(&seed, true);
        assert!(json.contains(&format!("\"pubkey\": \"{key}\"")), "{json}");
    }
}
