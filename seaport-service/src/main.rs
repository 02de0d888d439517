//! `seaport-service REGISTRY -p PORT -r ROLE@VERSION [--host H] [--tag T]... [--seed SEED | --seed-file F]`

fn main() {
    seaport_net::cli::init_logging();
    seaport_net::cli::raise_fd_limit();
    if let Some(shell) = seaport_net::cli::completions_requested() {
        return seaport_net::cli::print_completions::<seaport_service::Args>(shell, "seaport-service");
    }
    let args = seaport_net::config::parse::<seaport_service::Args>();
    let runtime = match seaport_net::cli::runtime(args.client.threads) {
        Ok(runtime) => runtime,
        Err(e) => seaport_net::cli::fatal("seaport-service", format!("cannot start the runtime: {e}")),
    };
    if let Err(e) = runtime.block_on(seaport_service::run(args)) {
        seaport_net::cli::exit_with::<seaport_service::Args>("seaport-service", e);
    }
}
