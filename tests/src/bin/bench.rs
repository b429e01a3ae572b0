//! The benchmark command (this rewrite beside upstream on the same apiserver
//! and emulator): prints one table and writes
//! `docs/benchmarks.md` and `docs/benchmarks.svg` (see `aadpodid_tests::bench`).
//!
//! `cargo run --release -p aadpodid-tests --bin bench --locked -- [--quick] [--rows 1,3] [--out docs/benchmarks.md]`
fn main() -> anyhow::Result<()> {
    aadpodid_tests::bench::main()
}
