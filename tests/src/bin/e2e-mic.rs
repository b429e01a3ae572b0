//! The `mic` command under a name of the test crate, so integration tests and
//! the local demo can start it as a process (`CARGO_BIN_EXE_e2e-mic`).
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mic::cli_main().await
}
