//! `seaport-service REGISTRY -p PORT -r ROLE@VERSION [--host H] [--tag T]... [--seed SEED | --seed-file F]`
use clap::Parser;

#[tokio::main]
async fn main() {
    seaport_net::cli::init_logging();
    seaport_net::cli::raise_fd_limit();
    let args = seaport_service::Args::parse();
    if let Err(e) = seaport_service::run(args).await {
        seaport_net::cli::exit_with::<seaport_service::Args>("seaport-service", e);
    }
}
