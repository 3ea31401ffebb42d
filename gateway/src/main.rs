//! The `gateway` binary: every command lives in [`gateway::cli`].
fn main() -> std::process::ExitCode {
    gateway::cli::main()
}
