//! The `mic` binary: [`mic::cli_main`], which sizes its own async runtime
//! for the container: `--worker-threads`, else the CPU limit's whole CPUs,
//! else one thread (a current-thread runtime); the chart's 200m gives one.

fn main() -> anyhow::Result<()> {
    mic::cli_main()
}
