//! The `pgveil` command (see `proxy::commands`).

fn main() -> std::process::ExitCode {
    proxy::commands::main()
}
