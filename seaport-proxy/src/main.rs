//! `seaport-proxy REGISTRY -p PORT -r ROLE@RANGE [--bind ADDR] [--balance STRATEGY]`
use clap::Parser;

#[tokio::main]
async fn main() {
    seaport_net::cli::init_logging();
    seaport_net::cli::raise_fd_limit();
    let args = seaport_proxy::Args::parse();
    if let Err(e) = seaport_proxy::run(args).await {
        seaport_net::cli::exit_with::<seaport_proxy::Args>("seaport-proxy", e);
    }
}
