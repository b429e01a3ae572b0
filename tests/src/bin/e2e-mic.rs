//! The `mic` command under a name of the test crate, so integration tests and
//! the local demo can start it as a process (`CARGO_BIN_EXE_e2e-mic`): the
//! shipped binary's code and runtime size (one thread without a CPU limit
//! or `--worker-threads`).
fn main() -> anyhow::Result<()> {
    mic::cli_main()
}
