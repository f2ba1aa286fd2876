//! The `cairn` binary: see [`cairn::cli`].

#[tokio::main]
async fn main() -> std::process::ExitCode {
    cairn::cli::main().await
}
