//! `seaport-seed [--json]`
use clap::Parser;

fn main() {
    let args = seaport_seed::Args::parse();
    let seed = seaport_net::identity::random_seed();
    seaport_net::cli::event(seaport_seed::render(&seed, args.json));
}
