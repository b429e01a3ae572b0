//! The `nmi` binary: the flags, parsed once, then [`nmi::cli_run`] on a
//! runtime sized for the container ([`nmi::args::RuntimeSize`]): one thread
//! (a current-thread runtime) under a CPU limit of one CPU or less, such as
//! the chart's 200m.

use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    let args = nmi::Args::parse();
    let size =
        nmi::args::RuntimeSize::of_process(args.worker_threads, nmi::args::DEFAULT_WORKER_THREADS);
    size.builder()
        .build()?
        .block_on(nmi::cli_run(args, Some(size)))
}
