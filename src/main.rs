use clap::Parser;

// A retaining allocator: every candle op allocates a fresh output buffer, and
// glibc's habit of returning large blocks to the OS makes each one fault its
// pages in again (see docs/perf.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = beitv2::cli::Cli::parse();
    beitv2::cli::init_logging(cli.verbose);
    match beitv2::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // `beitv2 classify ... | head` closes the pipe early: not an error.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
