//! `seaport-registry --seed SEED | --seed-file F [--listen ADDR] [--no-dht] [--dht-port N] [--bootstrap LIST]`

#[tokio::main]
async fn main() {
    seaport_net::cli::init_logging();
    seaport_net::cli::raise_fd_limit();
    let args = seaport_net::config::parse::<seaport_registry::Args>();
    if let Some(shell) = args.completions {
        return seaport_net::cli::print_completions::<seaport_registry::Args>(shell, "seaport-registry");
    }
    if let Err(e) = seaport_registry::run(args).await {
        seaport_net::cli::exit_with::<seaport_registry::Args>("seaport-registry", e);
    }
}
