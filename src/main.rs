use clap::Parser;

// A retaining allocator: every candle op allocates a fresh output buffer, and
// glibc's habit of returning large blocks to the OS makes each one fault its
// pages in again (see docs/perf.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe extern "C" {
    fn mi_option_get(option: i32) -> std::ffi::c_long;
    fn mi_option_set(option: i32, value: std::ffi::c_long);
}

/// Keeps freed memory in the process instead of returning it to the OS after
/// the purge delay: training allocates and frees the same large buffers every
/// step, and each return costs a round of page zeroing (docs/perf.md).
/// `mi_option_purge_delay` is option 15 in mimalloc v2 and v3; its default
/// (10 ms in v2, 1000 ms in v3, the version the crate builds by default)
/// confirms the index.
fn retain_freed_memory() {
    const MI_OPTION_PURGE_DELAY: i32 = 15;
    // SAFETY: plain calls into the linked mimalloc; option 15 exists in both
    // versions the crate can build, and it is only written when it reads as
    // one of the documented purge-delay defaults.
    unsafe {
        if matches!(mi_option_get(MI_OPTION_PURGE_DELAY), 10 | 1000) {
            mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        }
    }
}

fn main() -> std::process::ExitCode {
    retain_freed_memory();
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
