//! `seaport-proxy REGISTRY -p PORT -r ROLE@RANGE [--bind ADDR] [--balance STRATEGY]`

fn main() {
    seaport_net::cli::init_logging();
    seaport_net::cli::raise_fd_limit();
    if let Some(shell) = seaport_net::cli::completions_requested() {
        return seaport_net::cli::print_completions::<seaport_proxy::Args>(shell, "seaport-proxy");
    }
    let args = seaport_net::config::parse::<seaport_proxy::Args>();
    let runtime = match seaport_net::cli::runtime(args.client.threads) {
        Ok(runtime) => runtime,
        Err(e) => seaport_net::cli::fatal("seaport-proxy", format!("cannot start the runtime: {e}")),
    };
    if let Err(e) = runtime.block_on(seaport_proxy::run(args)) {
        seaport_net::cli::exit_with::<seaport_proxy::Args>("seaport-proxy", e);
    }
}
