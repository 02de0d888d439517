//! `seaport-seed [--json] [--seed-file PATH | --show PATH]`
use seaport_net::cli::{Failure, exit_with};

fn main() {
    let args = seaport_net::config::parse::<seaport_seed::Args>();
    if let Some(shell) = args.completions {
        return seaport_net::cli::print_completions::<seaport_seed::Args>(shell, "seaport-seed");
    }
    if let Some(path) = &args.show {
        match seaport_net::identity::load_seed(None, Some(path)) {
            Ok(Some(seed)) => println!("{}", seaport_seed::render_shown(&seed, path, args.json)),
            Ok(None) => {
                let text = format!("{} holds no seed", path.display());
                exit_with::<seaport_seed::Args>("seaport-seed", Failure::Usage(text));
            }
            Err(e) => exit_with::<seaport_seed::Args>("seaport-seed", Failure::Usage(e.to_string())),
        }
        return;
    }
    let seed = seaport_net::identity::random_seed();
    if let Some(path) = &args.seed_file
        && let Err(e) = seaport_seed::write_seed_file(path, &seed)
    {
        exit_with::<seaport_seed::Args>("seaport-seed", Failure::Usage(e));
    }
    println!("{}", seaport_seed::render(&seed, args.seed_file.as_deref(), args.json));
}
