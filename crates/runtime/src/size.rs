//! How many threads a process's async runtime gets: a flag when set, else
//! the container's CPU limit (the cgroup's CPU quota, rounded up to whole
//! CPUs: the chart's 200m gives one thread), else the program's default;
//! never more than the CPUs the process may run on unless the flag says so.
//! One thread is a current-thread runtime: everything runs on the thread
//! that calls `block_on`, so glibc's malloc serves it from one arena
//! (every further thread that allocates gets an arena of its own, and
//! memory freed in one arena is not reused by another).

/// A CPU limit: `quota_us` microseconds of CPU per `period_us`
/// (Kubernetes' `limits.cpu` of 200m is 20000 per 100000).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuQuota {
    /// CPU time allowed per period, microseconds.
    pub quota_us: u64,
    /// The period, microseconds.
    pub period_us: u64,
}

impl CpuQuota {
    /// Whole CPUs the quota covers, rounded up (at least 1).
    pub fn cpus(self) -> usize {
        if self.period_us == 0 {
            return 1;
        }
        usize::try_from(self.quota_us.div_ceil(self.period_us))
            .unwrap_or(usize::MAX)
            .max(1)
    }
}

/// A cgroup v2 `cpu.max` (`<quota> <period>`, or `max <period>` without a
/// limit).
pub fn parse_cpu_max(text: &str) -> Option<CpuQuota> {
    let mut words = text.split_whitespace();
    let quota = words.next()?.parse().ok()?;
    let period = words.next().map_or(Some(100_000), |p| p.parse().ok())?;
    (period > 0 && quota > 0).then_some(CpuQuota {
        quota_us: quota,
        period_us: period,
    })
}

/// A cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us` (`-1`: no limit).
pub fn parse_cfs(quota: &str, period: &str) -> Option<CpuQuota> {
    let quota: i64 = quota.trim().parse().ok()?;
    let period: u64 = period.trim().parse().ok()?;
    (quota > 0 && period > 0).then_some(CpuQuota {
        quota_us: quota.unsigned_abs(),
        period_us: period,
    })
}

/// This process's CPU limit, read from its cgroup (v2, then v1); `None`
/// when there is none or it cannot be read.
pub fn cgroup_cpu_quota() -> Option<CpuQuota> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    if let Some(max) = read("/sys/fs/cgroup/cpu.max") {
        return parse_cpu_max(&max);
    }
    ["/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"]
        .iter()
        .find_map(|dir| {
            parse_cfs(
                &read(&format!("{dir}/cpu.cfs_quota_us"))?,
                &read(&format!("{dir}/cpu.cfs_period_us"))?,
            )
        })
}

/// The runtime's threads: `flag` when set (not 0), else the CPU limit's
/// whole CPUs, else `default`; never more than the machine's `cpus` unless
/// the flag says so.
pub fn runtime_threads(flag: u32, quota: Option<CpuQuota>, cpus: usize, default: usize) -> usize {
    if flag > 0 {
        return flag as usize;
    }
    let want = quota.map_or(default, CpuQuota::cpus);
    want.min(cpus.max(1))
}

/// The runtime's size and what it was sized from, as a program logs it at
/// start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuntimeSize {
    /// Threads ([`runtime_threads`]); 1 is a current-thread runtime.
    pub threads: usize,
    /// `--worker-threads` (0: not set, or the program has no such flag).
    pub flag: u32,
    /// The cgroup's CPU limit, if any.
    pub quota: Option<CpuQuota>,
    /// CPUs this process may run on.
    pub cpus: usize,
    /// The program's threads without a flag or a CPU limit.
    pub default: usize,
}

impl RuntimeSize {
    /// The size from `flag`, `quota`, `cpus` and the program's `default`
    /// ([`runtime_threads`]).
    pub fn new(flag: u32, quota: Option<CpuQuota>, cpus: usize, default: usize) -> Self {
        RuntimeSize {
            threads: runtime_threads(flag, quota, cpus, default),
            flag,
            quota,
            cpus,
            default,
        }
    }

    /// The size for this process: `flag`, its cgroup's CPU limit, the CPUs
    /// it may run on and the program's `default`.
    pub fn of_process(flag: u32, default: usize) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        RuntimeSize::new(flag, cgroup_cpu_quota(), cpus, default)
    }

    /// A runtime of this size (current-thread for one thread), with its
    /// I/O and time drivers.
    pub fn builder(&self) -> tokio::runtime::Builder {
        let mut builder = if self.threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(self.threads);
            b
        };
        builder.enable_all();
        builder
    }
}

impl std::fmt::Display for RuntimeSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.threads <= 1 {
            f.write_str("1 thread (a current-thread runtime)")?;
        } else {
            write!(f, "{} worker threads", self.threads)?;
        }
        if self.flag > 0 {
            return write!(f, " from --worker-threads={}", self.flag);
        }
        match self.quota {
            Some(q) => write!(
                f,
                " from the cgroup's CPU limit of {}m",
                q.quota_us.saturating_mul(1000) / q.period_us.max(1)
            )?,
            None => write!(f, " (no CPU limit: {} by default)", self.default)?,
        }
        write!(f, ", {} CPUs available", self.cpus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A quota of `quota_us` per `period_us`.
    fn q(quota_us: u64, period_us: u64) -> Option<CpuQuota> {
        Some(CpuQuota {
            quota_us,
            period_us,
        })
    }

    #[test]
    fn runtime_threads_table() {
        // (flag, cgroup quota, machine CPUs, program default, threads)
        #[rustfmt::skip]
        let cases = [
            (0, q(20_000, 100_000), 8, 2, 1),   // the chart's 200m: one thread
            (0, q(100_000, 100_000), 8, 2, 1),  // 1 CPU
            (0, q(150_000, 100_000), 8, 2, 2),  // 1.5 CPUs: rounded up
            (0, q(800_000, 100_000), 2, 2, 2),  // never more than the machine
            (0, None, 8, 2, 2),                 // no limit: the default (NMI's)
            (0, None, 8, 1, 1),                 // no limit: the default (MIC's)
            (0, q(150_000, 100_000), 8, 1, 2),  // a limit wins over the default
            (0, None, 1, 2, 1),
            (3, q(20_000, 100_000), 2, 2, 3),   // the flag wins
            (0, q(1, 0), 4, 2, 1),              // a period of 0 reads as one CPU
        ];
        let got: Vec<usize> = cases
            .iter()
            .map(|(flag, quota, cpus, default, _)| runtime_threads(*flag, *quota, *cpus, *default))
            .collect();
        let want: Vec<usize> = cases.iter().map(|c| c.4).collect();
        assert_eq!(got, want, "{cases:?}");
    }

    #[test]
    fn runtime_size_says_what_it_was_sized_from() {
        for (size, want) in [
            (
                RuntimeSize::new(0, q(20_000, 100_000), 8, 2),
                "1 thread (a current-thread runtime) from the cgroup's CPU limit of 200m, 8 CPUs available",
            ),
            (
                RuntimeSize::new(0, q(150_000, 100_000), 8, 2),
                "2 worker threads from the cgroup's CPU limit of 1500m, 8 CPUs available",
            ),
            (
                RuntimeSize::new(0, None, 4, 2),
                "2 worker threads (no CPU limit: 2 by default), 4 CPUs available",
            ),
            (
                RuntimeSize::new(0, None, 4, 1),
                "1 thread (a current-thread runtime) (no CPU limit: 1 by default), 4 CPUs available",
            ),
            (
                RuntimeSize::new(3, q(20_000, 100_000), 2, 2),
                "3 worker threads from --worker-threads=3",
            ),
            (
                RuntimeSize::new(1, None, 2, 2),
                "1 thread (a current-thread runtime) from --worker-threads=1",
            ),
        ] {
            assert_eq!(size.to_string(), want, "{size:?}");
        }
    }

    #[test]
    fn cgroup_files_table() {
        for (text, want) in [
            ("20000 100000\n", q(20_000, 100_000)),
            ("max 100000\n", None),
            ("50000", q(50_000, 100_000)),
            ("0 100000", None),
            ("", None),
            ("x 100000", None),
            ("20000 0", None),
        ] {
            assert_eq!(parse_cpu_max(text), want, "{text:?}");
        }
        for (quota, period, want) in [
            ("20000\n", "100000\n", q(20_000, 100_000)),
            ("-1", "100000", None),
            ("20000", "0", None),
            ("x", "100000", None),
        ] {
            assert_eq!(parse_cfs(quota, period), want, "{quota:?} {period:?}");
        }
    }

    #[test]
    fn the_builder_builds_the_flavour_of_its_size() {
        for (threads, flavor) in [
            (1, tokio::runtime::RuntimeFlavor::CurrentThread),
            (2, tokio::runtime::RuntimeFlavor::MultiThread),
        ] {
            let size = RuntimeSize::new(threads, None, 4, 2);
            let rt = size.builder().build().expect("runtime");
            assert_eq!(rt.handle().runtime_flavor(), flavor, "{size}");
            assert_eq!(rt.handle().metrics().num_workers(), size.threads, "{size}");
        }
    }
}
