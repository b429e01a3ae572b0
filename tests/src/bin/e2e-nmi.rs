//! The `nmi` command under a name of the test crate, so integration tests and
//! the local demo can start it as a process (`CARGO_BIN_EXE_e2e-nmi`).
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    nmi::cli_main().await
}
