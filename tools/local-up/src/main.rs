//! `local-up`: the whole system on one machine, step by step (see the
//! package's library, `aadpodid_local_up`). Run it with `scripts/local-up.sh`.
fn main() -> std::process::ExitCode {
    aadpodid_local_up::main()
}
