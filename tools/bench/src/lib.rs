//! The benchmark command: MIC's and NMI's figures (ARM writes, time to
//! Assigned, token latency, memory and CPU, behaviour under floods) against
//! upstream's, on the same emulated world (`cargo run --release -p
//! aadpodid-bench --bin bench --locked -- [--quick]`).
//!
//! One run starts the test kit's shared [`Cluster`](aadpodid_testkit::Cluster)
//! (a real etcd and kube-apiserver on loopback) and, per [`Subject`], a world
//! of the kit's [`WorldBuilder`](aadpodid_testkit::world::WorldBuilder)
//! (`world`): an Azure emulator with Compute's real throttle buckets on a
//! sped-up clock, MIC as a process on the host, and NMI as a process inside a
//! node network namespace with pods attached (real iptables, only inside
//! namespaces this run creates). It prints one table, writes it with the
//! machine's description to `docs/benchmarks.md` and draws
//! `docs/benchmarks.svg`.
//!
//! MIC and NMI are the shipped release binaries ([`shipped`]: built here as
//! their images build them, or given with `--mic-bin` / `--nmi-bin`), so
//! their RSS and CPU, read from `/proc/<pid>`, are the product's; NMI is
//! pinned to one core. The namespace relay, the load generator (pinned to
//! another core) and the floods are this same binary re-executed with
//! [`ROLE_ENV`] set ([`child`]).
//!
//! Where the figures of the upstream column come from: [`subject::mic_program`]
//! and [`subject::nmi_program`], the only places that differ per [`Subject`].

pub mod child;
mod federated;
pub mod migration;
mod other;
pub mod quiet_core;
pub mod report;
pub mod shipped;
pub mod stats;
pub mod subject;
mod world;
pub mod writes;

use std::path::PathBuf;
use std::time::Duration;

pub use subject::Subject;

/// Environment variable that turns this binary into one of its children
/// (`relay`, `load`, `flood`).
pub const ROLE_ENV: &str = "AADPODID_BENCH_ROLE";

/// Command line of the bench.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "bench",
    about = "aad-pod-identity benchmarks: this project vs upstream"
)]
pub struct Options {
    /// Small sizes (seconds of runtime): checks that the bench works, nothing more.
    #[arg(long)]
    pub quick: bool,
    /// Rows to run, e.g. `1,3` (default: all of 1-8; with `--quick`, all
    /// but 6).
    #[arg(long, value_delimiter = ',')]
    pub rows: Vec<u8>,
    /// Markdown report; the SVG chart goes next to it with the `.svg` extension.
    #[arg(long, default_value = "docs/benchmarks.md")]
    pub out: PathBuf,
    /// With row 4: only nmi's figures (at rest, with its pods, under the
    /// floods), not mic's (which need the burst of row 2 first).
    #[arg(long)]
    pub nmi_only: bool,
    /// Skip the upstream column even when it can be run.
    #[arg(long)]
    pub no_upstream: bool,
    /// Keep the run's folders (MIC and NMI logs) and print where they are.
    #[arg(long)]
    pub keep_logs: bool,
    /// Which column runs first; `both` runs each twice, in both orders
    /// (this project, upstream, upstream, this project), and shows the
    /// spread (default: `both`; with `--quick`, `ours-first`).
    #[arg(long, value_enum)]
    pub order: Option<Order>,
    /// This project's mic executable (default: built here with `cargo
    /// build --release --locked -p mic --bin mic`).
    #[arg(long)]
    pub mic_bin: Option<PathBuf>,
    /// This project's nmi executable (default: built here likewise).
    #[arg(long)]
    pub nmi_bin: Option<PathBuf>,
}

/// The order the columns run in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Order {
    OursFirst,
    UpstreamFirst,
    Both,
}

impl Order {
    /// The subjects' runs, in order.
    pub fn runs(self) -> Vec<Subject> {
        use Subject::{ThisProject as Ours, Upstream as Up};
        match self {
            Order::OursFirst => vec![Ours, Up],
            Order::UpstreamFirst => vec![Up, Ours],
            Order::Both => vec![Ours, Up, Up, Ours],
        }
    }
}

impl Options {
    /// The order of the columns' runs.
    pub fn order(&self) -> Order {
        self.order.unwrap_or(if self.quick {
            Order::OursFirst
        } else {
            Order::Both
        })
    }

    /// Whether row `n` (1-5, 7, 8) is selected.
    pub fn row(&self, n: u8) -> bool {
        self.rows.is_empty() || self.rows.contains(&n)
    }

    /// Whether row 6 (the in-place migration, one run of about a minute
    /// for both columns) is selected: by default, or with `--quick` only
    /// when named.
    pub fn migration_row(&self) -> bool {
        self.rows.contains(&6) || (self.rows.is_empty() && !self.quick)
    }
}

/// The rows each subject runs in its own world (row 6, the migration,
/// runs once for both; row 8 measures this project only).
pub const SUBJECT_ROWS: [u8; 7] = [1, 2, 3, 4, 5, 7, 8];

/// Sizes and clock of one run; the same for every subject.
#[derive(Clone, Debug)]
pub struct Scale {
    /// Emulated seconds per wall second (emulator clock; MIC periods and
    /// budget refills are scaled by the same factor).
    pub speed: f64,
    /// Emulated VMSS write (LRO) durations, seconds: each write's is drawn
    /// uniformly from `[min, max)` by the emulator's generator seeded with
    /// [`Scale::lro_seed`].
    pub lro_seconds: (f64, f64),
    /// The same for standalone VMs' writes (row 7).
    pub vm_lro_seconds: (f64, f64),
    pub lro_seed: u64,
    /// Row 1: new pods timed, one after the other.
    pub first_token_samples: usize,
    /// Row 7: samples of a pod on another scale set (and on a VM) while
    /// one scale set's write runs.
    pub other_samples: usize,
    /// Row 2: pods, identities and scale sets of the burst.
    pub burst_pods: usize,
    pub burst_ids: usize,
    pub vmss: usize,
    /// Kubernetes nodes (VMSS instances) per scale set.
    pub nodes_per_vmss: usize,
    /// Row 3: how long each fixed rate of [`report::LOAD_RATES`] runs, and
    /// each step of the search for the peak sustainable rate.
    pub load_seconds: Duration,
    pub load_search_seconds: Duration,
    /// Row 3: the generator's keep-alive connections (requests in flight
    /// at most): nmi's default limit of connections from one address
    /// (`--max-connections-per-ip`, 32), the most one pod can hold.
    pub load_connections: usize,
    /// Row 4: pods on NMI's node; pods and identities MIC holds.
    pub nmi_pods: usize,
    pub big_pods: usize,
    pub big_ids: usize,
    /// Row 4: connections of each flood one pod sends NMI, and how long
    /// each flood is held at least.
    pub flood_connections: usize,
    pub flood_hold: Duration,
    /// Row 5: emulated idle time.
    pub idle: Duration,
    /// Bound on any convergence wait (wall).
    pub converge_timeout: Duration,
}

impl Scale {
    /// The full sizes: a 1,000-pod burst, 10,000 pods for MIC, 110 on
    /// NMI's node, 3,000-connection floods, ten emulated idle minutes.
    pub fn full() -> Self {
        Scale {
            speed: 10.0,
            lro_seconds: LRO_SECONDS,
            vm_lro_seconds: VM_LRO_SECONDS,
            lro_seed: 1,
            first_token_samples: 20,
            other_samples: 5,
            burst_pods: 1000,
            burst_ids: 50,
            vmss: 10,
            nodes_per_vmss: 10,
            load_seconds: Duration::from_secs(10),
            load_search_seconds: Duration::from_secs(5),
            load_connections: 32,
            nmi_pods: 110,
            big_pods: 10_000,
            big_ids: 1000,
            flood_connections: 3000,
            flood_hold: Duration::from_secs(5),
            idle: Duration::from_secs(600),
            converge_timeout: Duration::from_secs(10 * 60),
        }
    }

    /// Seconds of runtime; shows the bench works, not how fast anything is.
    pub fn quick() -> Self {
        Scale {
            speed: 100.0,
            lro_seconds: LRO_SECONDS,
            vm_lro_seconds: VM_LRO_SECONDS,
            lro_seed: 1,
            first_token_samples: 3,
            other_samples: 2,
            burst_pods: 40,
            burst_ids: 5,
            vmss: 2,
            nodes_per_vmss: 2,
            load_seconds: Duration::from_secs(1),
            load_search_seconds: Duration::from_millis(500),
            load_connections: 32,
            nmi_pods: 8,
            big_pods: 120,
            big_ids: 12,
            flood_connections: 200,
            flood_hold: Duration::from_secs(2),
            idle: Duration::from_secs(600),
            converge_timeout: Duration::from_secs(180),
        }
    }

    /// Identities the world's emulator holds: those of row 4's MIC, and
    /// enough for row 7's samples after the others' (three each).
    pub fn tenant_identities(&self) -> usize {
        self.big_ids
            .max(self.other_first_identity() + 3 * self.other_samples)
    }

    /// Row 7's first identity: after those of rows 1-4 (the burst's, row 1's
    /// samples and the ten of the NMI node's pods).
    pub fn other_first_identity(&self) -> usize {
        self.burst_ids.max(self.first_token_samples).max(10)
    }

    /// A wall duration for an emulated one.
    pub fn wall(&self, emulated: Duration) -> Duration {
        emulated.div_f64(self.speed)
    }
}

/// How long a VMSS identity write runs on Azure, seconds (the emulator's
/// fixed default is 45 s).
const LRO_SECONDS: (f64, f64) = (40.0, 60.0);
/// The same on a standalone VM.
const VM_LRO_SECONDS: (f64, f64) = (10.0, 20.0);

/// Entry point of `bench`: a child role when [`ROLE_ENV`] is set, else the
/// whole benchmark.
pub fn main() -> anyhow::Result<()> {
    if let Ok(role) = std::env::var(ROLE_ENV) {
        return child::run(&role);
    }
    use clap::Parser as _;
    let opts = Options::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(opts))
}

async fn run(opts: Options) -> anyhow::Result<()> {
    let scale = if opts.quick {
        Scale::quick()
    } else {
        Scale::full()
    };
    let started = std::time::Instant::now();
    let shipped = shipped::Shipped::locate(opts.mic_bin.as_deref(), opts.nmi_bin.as_deref())?;
    eprintln!(
        "mic: {}, nmi: {}; {}",
        shipped.mic.display(),
        shipped.nmi.display(),
        shipped.cores.describe()
    );
    let runs = opts.order().runs();
    let mut by_subject: Vec<(Subject, Vec<(String, report::Figures)>)> = Vec::new();
    for (i, subject) in runs.iter().copied().enumerate() {
        let figures = if subject == Subject::Upstream && opts.no_upstream {
            report::Figures::not_run("not run: --no-upstream")
        } else if !SUBJECT_ROWS.iter().any(|n| opts.row(*n)) {
            report::Figures::not_run("not run: row not selected")
        } else {
            eprintln!("run {} of {}: {}", i + 1, runs.len(), subject.title());
            subject::run_subject(subject, &scale, &opts, &shipped).await
        };
        let label = format!("run {} of {}", i + 1, runs.len());
        match by_subject.iter_mut().find(|(s, _)| *s == subject) {
            Some((_, v)) => v.push((label, figures)),
            None => by_subject.push((subject, vec![(label, figures)])),
        }
    }
    by_subject.sort_by_key(|(s, _)| *s);
    let mut columns: Vec<(Subject, report::Figures)> = by_subject
        .into_iter()
        .map(|(s, runs)| (s, report::Figures::merge(runs)))
        .collect();
    if opts.migration_row() {
        migration::row(&mut columns, opts.no_upstream, &shipped).await;
    }
    let mut table = report::Table::new(&scale, columns);
    // The runs that measured something, for the report's heading.
    table.runs = runs
        .into_iter()
        .filter(|s| !(opts.no_upstream && *s == Subject::Upstream))
        .collect();
    table.hidden_rows = SUBJECT_ROWS.into_iter().filter(|n| !opts.row(*n)).collect();
    if !opts.migration_row() {
        table.hidden_rows.push(6);
    }
    println!("{}", table.render_text());
    let machine = report::Machine::describe(started.elapsed(), opts.quick, &shipped);
    report::write_files(&opts.out, &table, &machine)?;
    eprintln!(
        "wrote {} and {}",
        opts.out.display(),
        opts.out.with_extension("svg").display()
    );
    Ok(())
}
