//! The `carrel` command, built into the test crate so that end-to-end tests can run it as a
//! process of their own (to `kill -9` it and start it again) from `CARGO_BIN_EXE_carrel-e2e`.

fn main() -> std::process::ExitCode {
    carrel_gateway::cli::main()
}
