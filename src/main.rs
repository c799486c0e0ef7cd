use std::process::ExitCode;

/// The worker allocates and frees small buffers for every event (bodies, parsed payloads,
/// requests); mimalloc's per-thread free lists serve that with a fraction of the system
/// allocator's time (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    appevents::interfaces::cli::main()
}
