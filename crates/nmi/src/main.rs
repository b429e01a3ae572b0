//! The `nmi` binary: `nmi::cli_main` on a runtime sized for the container
//! ([`nmi::args::runtime_threads`]): one thread (a current-thread runtime)
//! under a CPU limit of one CPU or less, such as the chart's 200m.

use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    // Only the thread count is read here; `cli_main` parses the flags again
    // and reports any error in them.
    let flag = nmi::Args::try_parse().map_or(0, |a| a.worker_threads);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = nmi::args::runtime_threads(flag, nmi::args::cgroup_cpu_quota(), cpus);
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_all().build()?.block_on(nmi::cli_main())
}
