//! The benchmark command (this rewrite beside upstream on the same apiserver
//! and emulator): prints one table and writes
//! `docs/benchmarks.md` and `docs/benchmarks.svg` (see the `aadpodid_bench` library).
//!
//! `cargo run --release -p aadpodid-bench --bin bench --locked -- [--quick] [--rows 1,3] [--out docs/benchmarks.md]`
fn main() -> anyhow::Result<()> {
    aadpodid_bench::main()
}
