//! The `mic` binary: [`mic::cli_main`] on a runtime sized for the container
//! ([`aadpodid_runtime::size::RuntimeSize`]): the CPU limit's whole CPUs,
//! and one thread (a current-thread runtime) under a limit of one CPU or
//! less (the chart's 200m) or without a limit.

/// Threads without a CPU limit. MIC's work is one control loop, its watches
/// and the ARM and Kubernetes requests it waits on; a current-thread runtime
/// keeps every allocation in one glibc arena. With a worker per CPU, the
/// ARM jobs and the watches allocated in the workers' arenas: at 10,000 pods
/// over 1,000 identities the peak RSS was 64-83 MiB on 2 CPUs against
/// 59-66 MiB on one thread (docs/mic-performance.md).
const DEFAULT_THREADS: usize = 1;

fn main() -> anyhow::Result<()> {
    aadpodid_runtime::size::RuntimeSize::of_process(0, DEFAULT_THREADS)
        .builder()
        .build()?
        .block_on(mic::cli_main())
}
