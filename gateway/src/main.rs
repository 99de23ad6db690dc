//! `carrel`: the command line lives in [`carrel_gateway::cli`].

use std::process::ExitCode;

/// mimalloc instead of glibc malloc: the hot path allocates small, short-lived buffers on every
/// request, and glibc's allocator showed up at ~6% of CPU under load (deploy/bench/).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    carrel_gateway::cli::main()
}
