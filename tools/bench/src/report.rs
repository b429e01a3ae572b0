//! The table (text and Markdown), the machine it ran on, and the SVG chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use aadpodid_testkit::flood::Kind;
use aadpodid_testkit::procfs;

use crate::{Scale, Subject};

/// Row 3's fixed rates, tokens per second.
pub const LOAD_RATES: [u32; 3] = [1000, 5000, 10_000];

/// Row 3's search: the highest p99 of a sustained rate.
pub const SUSTAINED_P99: Duration = Duration::from_millis(10);

/// One line of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    /// Median of the samples.
    FirstToken,
    FirstTokenP95,
    FirstTokenMin,
    FirstTokenMax,
    BurstEmulated,
    BurstWall,
    BurstWrites,
    BurstReads,
    BurstPolls,
    Burst429,
    /// The most ARM writes one scale set got in the burst.
    BurstVmssWrites,
    /// The most writes in flight on one scale set at once.
    BurstVmssInFlight,
    /// Open-loop load at a fixed rate (tokens/s, one of [`LOAD_RATES`]):
    /// latency percentiles from the time due, and the rate achieved.
    LoadP50(u32),
    LoadP99(u32),
    LoadMax(u32),
    LoadAchieved(u32),
    /// The highest rate sustained in the search.
    LoadPeak,
    NmiRestRss,
    NmiRestFds,
    NmiPeakRss,
    NmiPodsFds,
    /// Peak RSS of NMI during a flood.
    FloodRss(Kind),
    /// Peak open descriptors of NMI during a flood.
    FloodFds(Kind),
    /// Another pod's first token during a flood.
    FloodVictim(Kind),
    MicPeakRss,
    BigConvergeWall,
    IdleArmCalls,
    IdleCpu,
    /// Row 6: the in-place migration to the column's side.
    MigrationDuration,
    MigrationTakeover,
    MigrationArmWrites,
    MigrationAaiChanges,
    MigrationTokenErrors,
    MigrationImdsDirect,
    /// Row 7: a pod on another scale set while one scale set's write runs:
    /// its first token minus its own write (median, min, max over samples).
    OtherScaleSet,
    OtherScaleSetMin,
    OtherScaleSetMax,
    /// Row 7: the same for a pod on a standalone VM.
    OtherVm,
    OtherVmMin,
    OtherVmMax,
    /// Row 8 (this project only): a new pod with a federated identity, from
    /// its creation to its first token (median and p95 over samples).
    FederatedFirstToken,
    FederatedFirstTokenP95,
    /// Row 8: ARM writes and IMDS token requests over all its samples.
    FederatedArmWrites,
    FederatedImdsTokens,
}

impl Metric {
    /// Every metric, in table order.
    pub fn all() -> Vec<Metric> {
        let load = |r| {
            [
                Metric::LoadP50(r),
                Metric::LoadP99(r),
                Metric::LoadMax(r),
                Metric::LoadAchieved(r),
            ]
        };
        let flood = |k| {
            [
                Metric::FloodRss(k),
                Metric::FloodFds(k),
                Metric::FloodVictim(k),
            ]
        };
        Self::HEAD
            .into_iter()
            .chain(LOAD_RATES.into_iter().flat_map(load))
            .chain(Self::MIDDLE)
            .chain(Kind::ALL.into_iter().flat_map(flood))
            .chain(Self::TAIL)
            .chain(Self::OTHER)
            .chain(crate::federated::METRICS)
            .collect()
    }

    /// The metrics of rows 1 and 2.
    const HEAD: [Metric; 12] = [
        Metric::FirstToken,
        Metric::FirstTokenP95,
        Metric::FirstTokenMin,
        Metric::FirstTokenMax,
        Metric::BurstEmulated,
        Metric::BurstWall,
        Metric::BurstWrites,
        Metric::BurstReads,
        Metric::BurstPolls,
        Metric::Burst429,
        Metric::BurstVmssWrites,
        Metric::BurstVmssInFlight,
    ];

    /// Between the fixed rates and the floods.
    const MIDDLE: [Metric; 5] = [
        Metric::LoadPeak,
        Metric::NmiRestRss,
        Metric::NmiRestFds,
        Metric::NmiPeakRss,
        Metric::NmiPodsFds,
    ];

    /// After the floods: mic's figures of row 4, rows 5 and 6.
    const TAIL: [Metric; 10] = [
        Metric::MicPeakRss,
        Metric::BigConvergeWall,
        Metric::IdleArmCalls,
        Metric::IdleCpu,
        Metric::MigrationDuration,
        Metric::MigrationTakeover,
        Metric::MigrationArmWrites,
        Metric::MigrationAaiChanges,
        Metric::MigrationTokenErrors,
        Metric::MigrationImdsDirect,
    ];

    /// Row 7's.
    const OTHER: [Metric; 6] = [
        Metric::OtherScaleSet,
        Metric::OtherScaleSetMin,
        Metric::OtherScaleSetMax,
        Metric::OtherVm,
        Metric::OtherVmMin,
        Metric::OtherVmMax,
    ];

    /// Row of the table (1-8).
    pub fn row(self) -> u8 {
        match self {
            Metric::FirstToken
            | Metric::FirstTokenP95
            | Metric::FirstTokenMin
            | Metric::FirstTokenMax => 1,
            Metric::BurstEmulated
            | Metric::BurstWall
            | Metric::BurstWrites
            | Metric::BurstReads
            | Metric::BurstPolls
            | Metric::Burst429
            | Metric::BurstVmssWrites
            | Metric::BurstVmssInFlight => 2,
            Metric::LoadP50(_)
            | Metric::LoadP99(_)
            | Metric::LoadMax(_)
            | Metric::LoadAchieved(_)
            | Metric::LoadPeak => 3,
            Metric::NmiRestRss
            | Metric::NmiRestFds
            | Metric::NmiPeakRss
            | Metric::NmiPodsFds
            | Metric::FloodRss(_)
            | Metric::FloodFds(_)
            | Metric::FloodVictim(_)
            | Metric::MicPeakRss
            | Metric::BigConvergeWall => 4,
            Metric::IdleArmCalls | Metric::IdleCpu => 5,
            Metric::MigrationDuration
            | Metric::MigrationTakeover
            | Metric::MigrationArmWrites
            | Metric::MigrationAaiChanges
            | Metric::MigrationTokenErrors
            | Metric::MigrationImdsDirect => 6,
            Metric::OtherScaleSet
            | Metric::OtherScaleSetMin
            | Metric::OtherScaleSetMax
            | Metric::OtherVm
            | Metric::OtherVmMin
            | Metric::OtherVmMax => 7,
            Metric::FederatedFirstToken
            | Metric::FederatedFirstTokenP95
            | Metric::FederatedArmWrites
            | Metric::FederatedImdsTokens => 8,
        }
    }

    /// What the line says, with the run's sizes.
    pub fn label(self, s: &Scale) -> String {
        match self {
            Metric::FirstToken => format!(
                "first token for a new pod on a scale set, minus its own LRO (L drawn from {:.0}-{:.0} s emulated = {:.1}-{:.1} s wall): median of {} samples, ms",
                s.lro_seconds.0,
                s.lro_seconds.1,
                s.lro_seconds.0 / s.speed,
                s.lro_seconds.1 / s.speed,
                s.first_token_samples
            ),
            Metric::FirstTokenP95 => "first token minus L: p95, ms".into(),
            Metric::FirstTokenMin => "first token minus L: min, ms".into(),
            Metric::FirstTokenMax => "first token minus L: max, ms".into(),
            Metric::BurstEmulated => format!(
                "burst of {} pods / {} identities / {} scale sets: all Assigned, emulated s",
                s.burst_pods, s.burst_ids, s.vmss
            ),
            Metric::BurstWall => "burst: all Assigned, wall s".into(),
            Metric::BurstWrites => "burst: ARM writes (PUT/PATCH)".into(),
            Metric::BurstReads => "burst: ARM reads (GET of VMSS/VM)".into(),
            Metric::BurstPolls => "burst: ARM LRO status polls".into(),
            Metric::Burst429 => "burst: ARM 429 answers".into(),
            Metric::BurstVmssWrites => {
                "burst: ARM writes to one scale set, the most of any (each in the details)".into()
            }
            Metric::BurstVmssInFlight => {
                "burst: writes in flight on one scale set at once, the most of any".into()
            }
            Metric::LoadP50(r) => format!(
                "nmi on one core, open loop at {r} tokens/s for {:.0} s (cached token): p50 from the time due, ms",
                s.load_seconds.as_secs_f64()
            ),
            Metric::LoadP99(r) => format!("open loop at {r} tokens/s: p99, ms"),
            Metric::LoadMax(r) => format!("open loop at {r} tokens/s: max, ms"),
            Metric::LoadAchieved(r) => format!("open loop at {r} tokens/s: achieved, tokens/s"),
            Metric::LoadPeak => format!(
                "nmi on one core: peak sustainable rate ({:.1} s steps: all answered 200, ≥ 95 % achieved, p99 ≤ {} ms), tokens/s",
                s.load_search_seconds.as_secs_f64(),
                SUSTAINED_P99.as_millis()
            ),
            Metric::NmiRestRss => "RSS of nmi at rest (active, no pod on its node), MiB".into(),
            Metric::NmiRestFds => "open descriptors of nmi at rest".into(),
            Metric::NmiPeakRss => {
                format!("peak RSS of nmi with {} pods on its node, MiB", s.nmi_pods)
            }
            Metric::NmiPodsFds => format!(
                "open descriptors of nmi with {} pods on its node",
                s.nmi_pods
            ),
            Metric::FloodRss(k) => format!(
                "nmi under a flood of {} {} from one pod: peak RSS, MiB",
                s.flood_connections,
                k.title()
            ),
            Metric::FloodFds(k) => format!("{}: peak open descriptors of nmi", k.title()),
            Metric::FloodVictim(k) => format!(
                "{}: another pod's first token for a new resource meanwhile, ms",
                k.title()
            ),
            Metric::MicPeakRss => format!(
                "peak RSS of mic with {} pods and {} identities, MiB",
                s.big_pods, s.big_ids
            ),
            Metric::BigConvergeWall => format!(
                "mic: time for the last {} pods to be all Assigned, wall s",
                s.big_pods.saturating_sub(s.burst_pods)
            ),
            Metric::IdleArmCalls => format!(
                "idle: mic ARM calls over {:.0} minutes (emulated)",
                s.idle.as_secs_f64() / 60.0
            ),
            Metric::IdleCpu => format!(
                "idle: mic CPU (utime+stime), s (over {:.0} s wall)",
                s.wall(s.idle).as_secs_f64()
            ),
            Metric::MigrationDuration => "in-place migration to the column's side (this project: upgrade from upstream; upstream: rollback to it): nmi on every node and mic swapped, wall s".into(),
            Metric::MigrationTakeover => {
                "migration: mic lock takeover after the old leader's SIGTERM, wall s".into()
            }
            Metric::MigrationArmWrites => "migration: ARM writes (both mics)".into(),
            Metric::MigrationAaiChanges => {
                "migration: AzureAssignedIdentity changes (status, rewrites, recreates)".into()
            }
            Metric::MigrationTokenErrors => {
                "migration: pods' token requests that got no token".into()
            }
            Metric::MigrationImdsDirect => {
                "migration: pods' requests that reached IMDS around nmi".into()
            }
            Metric::OtherScaleSet => format!(
                "while one scale set's LRO runs: first token for a pod on another scale set, minus its own LRO: median of {} samples, ms",
                s.other_samples
            ),
            Metric::OtherScaleSetMin => "another scale set: min, ms".into(),
            Metric::OtherScaleSetMax => "another scale set: max, ms".into(),
            Metric::OtherVm => format!(
                "while one scale set's LRO runs: first token for a pod on a standalone VM (L drawn from {:.0}-{:.0} s emulated), minus its own LRO: median, ms",
                s.vm_lro_seconds.0, s.vm_lro_seconds.1
            ),
            Metric::OtherVmMin => "a standalone VM: min, ms".into(),
            Metric::OtherVmMax => "a standalone VM: max, ms".into(),
            Metric::FederatedFirstToken => format!(
                "first token for a new pod with a federated identity (this project only; goal < 200 ms, no ARM write): median of {} samples, ms",
                s.first_token_samples
            ),
            Metric::FederatedFirstTokenP95 => "federated first token: p95, ms".into(),
            Metric::FederatedArmWrites => "federated: ARM writes over all samples".into(),
            Metric::FederatedImdsTokens => {
                "federated: IMDS token requests over all samples".into()
            }
        }
    }
}

/// A measured value, or why there is none.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    Value(f64),
    /// The same figure from several runs: their mean, min and max.
    Spread {
        mean: f64,
        min: f64,
        max: f64,
    },
    Text(String),
}

impl Cell {
    /// As printed.
    pub fn render(&self) -> String {
        match self {
            Cell::Value(v) => format_number(*v),
            Cell::Spread { mean, min, max } if min == max => format_number(*mean),
            Cell::Spread { mean, min, max } => format!(
                "{} ({}–{})",
                format_number(*mean),
                format_number(*min),
                format_number(*max)
            ),
            Cell::Text(t) => t.clone(),
        }
    }

    /// The cell of several runs' cells: one value as it is, several values
    /// as their spread, texts (one run's failure) with the run they come from.
    fn merge(cells: &[(&str, Option<&Cell>)]) -> Cell {
        let values: Vec<f64> = cells
            .iter()
            .filter_map(|(_, c)| match c {
                Some(Cell::Value(v)) => Some(*v),
                _ => None,
            })
            .collect();
        if values.len() == cells.len() {
            return match values[..] {
                [v] => Cell::Value(v),
                _ => Cell::Spread {
                    mean: values.iter().sum::<f64>() / values.len() as f64,
                    min: values.iter().copied().fold(f64::INFINITY, f64::min),
                    max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                },
            };
        }
        let texts: Vec<String> = cells
            .iter()
            .map(|(_, c)| c.map_or_else(|| "not run".to_string(), Cell::render))
            .collect();
        if texts.iter().all(|t| *t == texts[0]) {
            return Cell::Text(texts[0].clone());
        }
        let each: Vec<String> = cells
            .iter()
            .zip(texts)
            .map(|((label, _), t)| format!("{label}: {t}"))
            .collect();
        Cell::Text(each.join("; "))
    }
}

fn format_number(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// One subject's column.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    cells: BTreeMap<Metric, Cell>,
    /// Details worth keeping next to the table.
    pub notes: Vec<String>,
}

impl Figures {
    /// A column where nothing ran, for `reason`.
    pub fn not_run(reason: &str) -> Self {
        let mut f = Figures::default();
        f.fill_missing(reason);
        f
    }

    pub fn set(&mut self, m: Metric, v: f64) {
        self.cells.insert(m, Cell::Value(v));
    }

    pub fn set_text(&mut self, m: Metric, t: &str) {
        self.cells.insert(m, Cell::Text(t.to_string()));
    }

    pub fn note(&mut self, n: String) {
        self.notes.push(n);
    }

    /// Sets `t` in every cell not set yet.
    pub fn fill_missing(&mut self, t: &str) {
        for m in Metric::all() {
            self.cells
                .entry(m)
                .or_insert_with(|| Cell::Text(t.to_string()));
        }
    }

    pub fn get(&self, m: Metric) -> Option<&Cell> {
        self.cells.get(&m)
    }

    /// The numeric value of `m`, if measured (the mean over runs).
    pub fn value(&self, m: Metric) -> Option<f64> {
        match self.cells.get(&m) {
            Some(Cell::Value(v)) => Some(*v),
            Some(Cell::Spread { mean, .. }) => Some(*mean),
            _ => None,
        }
    }

    /// One column of several runs of the same subject (`label`, figures):
    /// each cell merged ([`Cell::merge`]), each run's notes under its label
    /// when there are several.
    pub fn merge(runs: Vec<(String, Figures)>) -> Figures {
        if runs.len() == 1 {
            return runs.into_iter().next().map(|(_, f)| f).unwrap_or_default();
        }
        let mut out = Figures::default();
        for m in Metric::all() {
            let cells: Vec<(&str, Option<&Cell>)> =
                runs.iter().map(|(l, f)| (l.as_str(), f.get(m))).collect();
            if cells.iter().any(|(_, c)| c.is_some()) {
                out.cells.insert(m, Cell::merge(&cells));
            }
        }
        for (label, f) in runs {
            out.notes
                .extend(f.notes.into_iter().map(|n| format!("[{label}] {n}")));
        }
        out
    }
}

/// The whole result of a run.
#[derive(Clone, Debug)]
pub struct Table {
    pub scale: Scale,
    pub columns: Vec<(Subject, Figures)>,
    /// Rows left out of the table and the chart (not run in this mode).
    pub hidden_rows: Vec<u8>,
    /// The subjects' runs of rows 1-5, 7 and 8, in the order they ran.
    pub runs: Vec<Subject>,
}

impl Table {
    pub fn new(scale: &Scale, columns: Vec<(Subject, Figures)>) -> Self {
        Table {
            scale: scale.clone(),
            columns,
            hidden_rows: Vec::new(),
            runs: Vec::new(),
        }
    }

    /// The metrics shown, in table order.
    fn metrics(&self) -> Vec<Metric> {
        Metric::all()
            .into_iter()
            .filter(|m| !self.hidden_rows.contains(&m.row()))
            .collect()
    }

    fn rows(&self) -> Vec<Vec<String>> {
        self.metrics()
            .iter()
            .map(|m| {
                let mut r = vec![m.row().to_string(), m.label(&self.scale)];
                for (_, f) in &self.columns {
                    r.push(
                        f.get(*m)
                            .map_or_else(|| "not run".to_string(), Cell::render),
                    );
                }
                r
            })
            .collect()
    }

    fn header(&self) -> Vec<String> {
        let mut h = vec!["#".to_string(), "metric".to_string()];
        h.extend(self.columns.iter().map(|(s, _)| s.title().to_string()));
        h
    }

    /// The table as printed (Markdown pipe table, readable as text).
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let header = self.header();
        let _ = writeln!(out, "| {} |", header.join(" | "));
        let _ = writeln!(
            out,
            "|{}",
            header
                .iter()
                .enumerate()
                .map(|(i, _)| if i >= 2 { "---:|" } else { "---|" })
                .collect::<String>()
        );
        for r in self.rows() {
            // One line per metric: a failure's log tail is joined up.
            let r: Vec<String> = r
                .into_iter()
                .map(|c| c.replace('|', "/").replace('\n', " "))
                .collect();
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        out
    }
}

/// Where and when the run happened.
#[derive(Clone, Debug)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory: String,
    pub kernel: String,
    pub date: String,
    pub commit: String,
    pub took: Duration,
    pub quick: bool,
    /// Where nmi and the load generator ran.
    pub cores: String,
}

impl Machine {
    /// Reads `/proc`, `date` and the Git commit of the work tree (read-only).
    pub fn describe(took: Duration, quick: bool, shipped: &crate::shipped::Shipped) -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let dirty =
            !command_text("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: cpu_model(&read("/proc/cpuinfo")),
            memory: memory_total(&read("/proc/meminfo")),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            date: command_text("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            commit: commit_text(
                &command_text("git", &["rev-parse", "--short", "HEAD"]),
                dirty,
            ),
            took,
            quick,
            cores: shipped.cores.describe(),
        }
    }
}

/// What `prog args` prints in the repository (trimmed), or `unknown`.
fn command_text(prog: &str, args: &[&str]) -> String {
    std::process::Command::new(prog)
        .args(args)
        .current_dir(aadpodid_testkit::repo_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The first `model name` of `/proc/cpuinfo`, or `unknown`.
fn cpu_model(cpuinfo: &str) -> String {
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// `MemTotal` of `/proc/meminfo` in GiB, or `unknown`.
fn memory_total(meminfo: &str) -> String {
    procfs::kib_field(meminfo, "MemTotal:").map_or_else(
        || "unknown".into(),
        |kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0),
    )
}

/// The commit as the report names it.
fn commit_text(head: &str, dirty: bool) -> String {
    let note = if dirty {
        " (with uncommitted changes)"
    } else {
        ""
    };
    format!("{head}{note}")
}

/// Writes the Markdown report at `md` and the chart next to it (`.svg`).
pub fn write_files(md: &Path, table: &Table, m: &Machine) -> anyhow::Result<()> {
    if let Some(dir) = md.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let svg = md.with_extension("svg");
    std::fs::write(md, markdown(table, m, &svg))?;
    std::fs::write(&svg, chart(table))?;
    Ok(())
}

/// The report: title, machine, the table and the chart, how each row is
/// measured, what explains the upstream column, and each column's details.
fn markdown(t: &Table, m: &Machine, svg: &Path) -> String {
    let mut out = String::new();
    write_heading(&mut out, t, m, svg);
    write_method(&mut out, &t.scale, m);
    write_differences(&mut out, &t.scale);
    write_details(&mut out, t);
    out
}

/// Title, the command that wrote the report, the machine, the table and
/// the chart.
fn write_heading(out: &mut String, t: &Table, m: &Machine, svg: &Path) {
    let _ = writeln!(
        out,
        "# Benchmarks: this project and upstream aad-pod-identity v1.8.17\n"
    );
    let _ = writeln!(
        out,
        "Written by `cargo run --release -p aadpodid-bench --bin bench --locked{}` (tools/bench/); do not edit by hand.\n",
        if m.quick { " -- --quick" } else { "" }
    );
    let _ = writeln!(
        out,
        "- machine: {} CPUs ({}), {} memory, Linux {}\n- date: {}, commit {}, run took {:.0} s{}\n",
        m.cpus,
        m.cpu_model,
        m.memory,
        m.kernel,
        m.date,
        m.commit,
        m.took.as_secs_f64(),
        if m.quick {
            "\n- **quick mode**: small sizes, figures say only that the bench works"
        } else {
            ""
        }
    );
    if t.runs.len() > 1 {
        let order: Vec<&str> = t.runs.iter().map(|s| s.title()).collect();
        let twice = t
            .runs
            .iter()
            .any(|s| t.runs.iter().filter(|r| *r == s).count() > 1);
        let _ = writeln!(
            out,
            "Rows 1-5, 7 and 8 ran in this order: {}{}.\n",
            order.join(", then "),
            if twice {
                "; a cell measured in both runs shows their mean and (min–max)"
            } else {
                ""
            }
        );
    }
    out.push_str(&t.render_text());
    let _ = writeln!(
        out,
        "\n![chart]({})\n",
        svg.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    );
}

/// "How it is measured", with the run's sizes.
fn write_method(out: &mut String, s: &Scale, m: &Machine) {
    let _ = writeln!(out, "## How it is measured\n");
    let _ = writeln!(
        out,
        "- One process starts a real etcd + kube-apiserver (the test harness) and, per column, the Azure emulator in-process with Compute's throttle buckets at their real sizes (PutVMScaleSet: 12 burst, 4/min per scale set; 1500/500 per subscription; ARM 250 reads/200 writes burst) on a clock running {speed}× (1 wall s = {speed} emulated s). VMSS writes are long-running operations whose durations the emulator draws per write, uniformly from [{lro0}, {lro1}) emulated s (a standalone VM's from [{vm0}, {vm1}) s), with a generator seeded with {seed}, so a run's sequence is reproducible; `Retry-After` is divided by the speed.\n\
         - mic and nmi are the shipped release binaries (`cargo build --release --locked -p mic --bin mic`, likewise nmi, as their images build them), each its own process; {cores}.\n\
         - mic runs with its periods divided by {speed} (`--identity-assignment-reconcile-interval`: each mic's shipped default, this project's 30 min safety net = {ri}, upstream's 3 min = {riu}; `--syncRetryDuration={sr}`, `--update-user-msi-retry-interval={ui}`) and its write budget refills multiplied by {speed}; lease timings stay real.\n\
         - nmi runs inside a node network namespace with its iptables rules; pods are network namespaces attached by veth; the apiserver and IMDS reach the node namespace over Unix-socket relays, never through the root namespace.\n\
         - Row 1: {samples} samples one after the other, each a new Pod bound to an identity its scale set does not have yet: from creating the Pod (nodeName, then podIP via the status subresource) until `curl` in the pod's namespace (polled every 50 ms) gets 200 from 169.254.169.254, minus that Pod's own L (the duration of the first write to its scale set since the Pod was created, from the emulator's operations) in wall time; median, nearest-rank p95, min and max. After its token each sample's Pod is reported at an address no namespace backs, so the next one is alone at the pod's address.\n\
         - Row 2: pods are created 32 at a time while mic runs (Pod objects only, no kubelet); time until every AzureAssignedIdentity is Assigned (polled every 250 ms); ARM counts come from the emulator's counters over the same span; writes per scale set and in flight come from its request log: an accepted write is in flight from its answer until its operation ends (L later), a refused one (409, 429) at the instant it was answered, since it was sent while the scale set was busy or its budget spent.\n\
         - Row 3: an open-loop generator in one pod namespace, pinned to its own core, sends token requests at a fixed rate over {conns} HTTP/1.1 keep-alive connections (nmi's default limit per address; opened first; they bound the requests in flight) after one warm-up request, so nmi answers from its token cache: request i is due at start + i/rate, a free connection takes the next due request and sends it at its time, and latency counts from the time due, so requests held up behind a slow answer count their wait (no coordinated omission); a request gets 2 s at most. Each of {rates} tokens/s runs {ls:.0} s. The peak sustainable rate is searched from those results, doubling up (or halving down) in steps of {ss:.1} s, then two geometric bisections; a rate is sustained when every request due got 200, at least 95 % of it was achieved and p99 ≤ {sp} ms. For these runs the benchmark's other processes (itself with the emulator, etcd, the apiserver, mic, the relays) are moved to the generator's core, so that nmi's core runs nmi alone (and the kernel); they share the generator's core, which shows in its send lag. The details give, per run, errors, how late the generator sent (its own limit) and nmi's CPU.\n\
         - Row 4: VmHWM of `/proc/<pid>/status`; descriptors are the entries of `/proc/<pid>/fd`. nmi at rest: VmRSS once active, before any pod is on its node. nmi with pods: {nmi} Pod objects with IPs and Assigned AAIs on its node, after a token request. mic: after the burst, the rest of {big} pods over {ids} identities (identity j on scale set j mod {k}) all Assigned.\n\
         - Row 4, floods: nmi is restarted before each flood; one pod (an ordinary pod with an Assigned identity) opens {flood} TCP connections to 169.254.169.254:80 (256 being opened at a time) and holds them at least {hold:.0} s: slow bodies = a token request per connection, each for its own `resource`, declaring `Content-Length: 65536` and sending nothing more; distinct resources = a complete token request per connection, each for its own `resource` (the emulator issues tokens for any resource); idle connections = nothing sent. Peak RSS is the larger of VmHWM and VmRSS sampled every 100 ms; peak descriptors are sampled every 100 ms. Meanwhile a second pod on the node asks for its first token for a resource nobody asked for yet (`curl`, 30 s at most); the details list what the flood got back and nmi's descriptors after it stopped.\n\
         - Row 5: after the burst converged and 60 emulated s of quiet, ARM requests (writes + reads + LRO polls) and mic's utime+stime from `/proc/<pid>/stat` over {idle:.0} emulated s ({idlew:.0} wall s), each mic with its shipped drift-check period; every ARM call is counted, a safety-net check's too (the details say how many of this project's ran in the span: it logs each).\n\
         - Row 6 (one run for both columns, the test kit's upgrade scenario, the one `tests/tests/migration_upgrade.rs` asserts on): a cluster of its own, two nodes (one per scale set) with two pods each asking for a token every 250 ms throughout, three identities, the emulator at 30×. Before Go starts, upstream's chart 4.1.18 is `helm install`ed; right before the processes are swapped this project's CRDs are applied and `helm upgrade` writes this chart, and `helm rollback` comes before the way back (mic and nmi run with the test kit's flags). Upstream's Go mic (two replicas) and Go nmi assign and serve first; then this project's nmi is started beside Go nmi on each node in turn, Go nmi gets SIGTERM once the new redirect is in place (surge), this project's two mic replicas start beside Go's and Go mic's replicas are stopped, standby first (the \"this project\" column); then back: on each node this project's nmi is stopped before Go nmi starts (delete first, as upstream's chart rolls), Go mic's replicas start beside ours and ours are stopped (the \"upstream\" column). Both mics have a 4 s leader lease. ARM writes come from the emulator's request log (sides told apart by the Compute api-version upstream's Go SDK sends), AzureAssignedIdentity changes from listing them every 100 ms, requests that reached IMDS around nmi from the node relay's log of each IMDS connection's peer.\n\
         - Row 7: {other} samples; in each, a Pod A on one of the burst's scale sets (in turn) asks for an identity the scale set does not have; a quarter into A's write (on the emulated clock, from the emulator's operations), a Pod B on nmi's node (a scale set of its own) and a Pod C on a standalone VM's node (a second nmi, started for this row) ask for identities of their own, each the only Pod at its pod namespace's address. B's and C's time from their creation to a token in their pod namespaces (`curl` polled every 50 ms, both at once) minus their own write's L (wall); median, min and max. The details say, per sample, when B's and C's writes began against the end of A's (negative: while A's ran). Every Pod of the row is Assigned before the next sample.\n\
         - Row 8 (this project only: upstream has no federated token source): the emulator's Entra ID trusts the cluster's ServiceAccount issuer (its discovery document and keys); an AzureIdentity annotated `aadpodidentity.k8s.io/token-source: federated`; {samples} samples one after the other, each a new Pod on nmi's node running as a ServiceAccount of its own (nmi caches a federated token per ServiceAccount) with a federated credential for it: from creating the Pod until `curl` in the pod's namespace (polled every 50 ms) gets 200 from 169.254.169.254 (mic marks the AzureAssignedIdentity Assigned with no ARM write; nmi asks the API server for the ServiceAccount's token bound to the Pod and exchanges it at Entra ID); median and nearest-rank p95; ARM writes and IMDS token requests from the emulator's counters over all samples.\n\
         - The machine is shared: other jobs ran on the same {cpus} cores during the run, so times and CPU figures are upper bounds.",
        speed = s.speed,
        lro0 = s.lro_seconds.0,
        lro1 = s.lro_seconds.1,
        vm0 = s.vm_lro_seconds.0,
        vm1 = s.vm_lro_seconds.1,
        seed = s.lro_seed,
        other = s.other_samples,
        ri = crate::subject::go_duration_text(s.wall(crate::subject::reconcile_default(
            crate::Subject::ThisProject
        ))),
        riu = crate::subject::go_duration_text(
            s.wall(crate::subject::reconcile_default(crate::Subject::Upstream))
        ),
        sr = crate::subject::go_duration_text(s.wall(Duration::from_secs(3600))),
        ui = crate::subject::go_duration_text(s.wall(Duration::from_secs(1))),
        conns = s.load_connections,
        rates = LOAD_RATES.map(|r| r.to_string()).join(", "),
        ls = s.load_seconds.as_secs_f64(),
        ss = s.load_search_seconds.as_secs_f64(),
        sp = SUSTAINED_P99.as_millis(),
        nmi = s.nmi_pods,
        big = s.big_pods,
        ids = s.big_ids,
        k = s.vmss,
        flood = s.flood_connections,
        hold = s.flood_hold.as_secs_f64(),
        idle = s.idle.as_secs_f64(),
        idlew = s.wall(s.idle).as_secs_f64(),
        cpus = m.cpus,
        cores = m.cores,
        samples = s.first_token_samples,
    );
}

/// "Differences that explain the upstream column".
fn write_differences(out: &mut String, s: &Scale) {
    let _ = writeln!(
        out,
        "\n## Differences that explain the upstream column\n\n\
         - Upstream NMI caches no token: in row 3 every request goes on to IMDS, whose limits (20 token requests/s per VM on the emulated clock, so {speed}× that in wall time, and 5 concurrent) it meets; this project's NMI answers from its cache.\n\
         - Upstream NMI re-reads the AzureAssignedIdentity every `--find-identity-retry-interval` (5 s) while it is not Assigned; this project's NMI waits on its watch (row 1).\n\
         - Upstream MIC's client-go paces its apiserver requests at its default `--clientQps=5`; this project's MIC paces them only when `--clientQps` is given, and the benchmark gives it to neither. Upstream MIC has no ARM write budget, so only its periods are scaled (rows 2, 4, 5).\n\
         - Both are started with their defaults otherwise, the same emulator settings, the same apiserver, the same pods and identities.",
        speed = s.speed
    );
}

/// Each column's details (notes of the rows), when it has any.
fn write_details(out: &mut String, t: &Table) {
    for (subject, f) in &t.columns {
        if f.notes.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\n### Details: {}\n", subject.title());
        for n in &f.notes {
            let _ = writeln!(out, "- {n}");
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Colours of the columns' bars, in column order.
const COLORS: [&str; 2] = ["#2b6cb0", "#dd6b20"];
/// Width of the labels' column, of the longest bar, and height of a line (px).
const LABEL_W: f64 = 560.0;
const BAR_W: f64 = 300.0;
const LINE_H: f64 = 16.0;

/// A horizontal bar chart: one group per metric, each bar scaled to the
/// larger value of its group.
pub fn chart(t: &Table) -> String {
    let group_h = LINE_H * (t.columns.len() as f64 + 1.0) + 8.0;
    let metrics = t.metrics();
    let height = 60.0 + group_h * metrics.len() as f64;
    let width = LABEL_W + BAR_W + 180.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    chart_legend(&mut out, t);
    let mut y = 50.0;
    for m in metrics {
        chart_group(&mut out, t, m, y);
        y += group_h;
    }
    out.push_str("</svg>\n");
    out
}

/// One coloured square and title per column, side by side.
fn chart_legend(out: &mut String, t: &Table) {
    let mut x = 10.0;
    for (i, (s, _)) in t.columns.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let _ = writeln!(
            out,
            r#"<rect x="{x}" y="14" width="12" height="12" fill="{c}"/><text x="{}" y="24">{}</text>"#,
            x + 16.0,
            escape(s.title())
        );
        x += 160.0;
    }
}

/// Metric `m`'s group from height `y`: its label, then per column a bar
/// (scaled to the group's largest value) or the cell's text.
fn chart_group(out: &mut String, t: &Table, m: Metric, y: f64) {
    let _ = writeln!(
        out,
        r#"<text x="10" y="{}" font-weight="bold">{}. {}</text>"#,
        y + 12.0,
        m.row(),
        escape(&m.label(&t.scale))
    );
    let max = t
        .columns
        .iter()
        .filter_map(|(_, f)| f.value(m))
        .fold(0.0_f64, |a, v| a.max(v.abs()));
    for (i, (_, f)) in t.columns.iter().enumerate() {
        let by = y + LINE_H * (i as f64 + 1.0);
        let c = COLORS[i % COLORS.len()];
        match (f.value(m), f.get(m)) {
            (Some(v), Some(cell)) => {
                let w = if max > 0.0 {
                    BAR_W * v.abs() / max
                } else {
                    0.0
                };
                let _ = writeln!(
                    out,
                    r#"<rect x="{LABEL_W}" y="{}" width="{w:.1}" height="{}" fill="{c}"/><text x="{:.1}" y="{}">{}</text>"#,
                    by + 2.0,
                    LINE_H - 4.0,
                    LABEL_W + w + 4.0,
                    by + 12.0,
                    escape(&cell.render())
                );
            }
            (_, other) => {
                let text = other.map_or_else(|| "not run".to_string(), Cell::render);
                let short: String = text.chars().take(70).collect();
                let _ = writeln!(
                    out,
                    r##"<text x="{LABEL_W}" y="{}" fill="#718096">{}</text>"##,
                    by + 12.0,
                    escape(&short)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        let mut ours = Figures::default();
        ours.set(Metric::FirstToken, 12.5);
        ours.set(Metric::BurstWall, 1234.0);
        ours.set_text(Metric::IdleCpu, "failed: a <b> | c\nlog");
        let upstream = Figures::not_run("not run: --no-upstream");
        Table::new(
            &crate::Scale::quick(),
            vec![(Subject::ThisProject, ours), (Subject::Upstream, upstream)],
        )
    }

    #[test]
    fn the_machine_is_described_from_proc_texts() {
        let cpuinfo =
            "processor\t: 0\nmodel name\t: AMD EPYC 7763\nprocessor\t: 1\nmodel name\t: other\n";
        assert_eq!(cpu_model(cpuinfo), "AMD EPYC 7763");
        assert_eq!(cpu_model(""), "unknown");
        assert_eq!(memory_total("MemTotal:        8039784 kB\n"), "7.7 GiB");
        assert_eq!(memory_total("MemFree: 1 kB\n"), "unknown");
        assert_eq!(commit_text("abc1234", false), "abc1234");
        assert_eq!(
            commit_text("abc1234", true),
            "abc1234 (with uncommitted changes)"
        );
    }

    #[test]
    fn numbers_keep_a_few_significant_digits() {
        for (v, text) in [
            (1234.0, "1234"),
            (123.4, "123"),
            (12.34, "12.3"),
            (1.234, "1.23"),
            (3.0, "3"),
        ] {
            assert_eq!(format_number(v), text, "{v}");
        }
    }

    #[test]
    fn the_text_table_has_a_line_per_metric_and_no_stray_pipe() {
        let text = table().render_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "| # | metric | this project | upstream v1.8.17 |");
        assert_eq!(lines[1], "|---|---|---:|---:|");
        assert_eq!(lines.len(), 2 + Metric::all().len());
        let mut without = table();
        without.hidden_rows = vec![6];
        let shown = without.render_text().lines().count();
        assert_eq!(
            shown,
            2 + Metric::all().iter().filter(|m| m.row() != 6).count()
        );
        assert!(!chart(&without).contains("migration"));
        let first = lines[2];
        assert!(first.starts_with("| 1 | first token"), "{first}");
        assert!(
            first.ends_with("| 12.5 | not run: --no-upstream |"),
            "{first}"
        );
        let idle = lines
            .iter()
            .find(|l| l.contains("idle: mic CPU"))
            .copied()
            .unwrap_or_default();
        assert!(idle.contains("failed: a <b> / c log"), "{idle}");
    }

    #[test]
    fn runs_of_a_subject_merge_into_one_column() {
        let mut a = Figures::default();
        a.set(Metric::FirstToken, 10.0);
        a.set(Metric::BurstWall, 3.0);
        a.set_text(Metric::IdleCpu, "not run: row not selected");
        a.set(Metric::Burst429, 0.0);
        a.note("one".into());
        let mut b = Figures::default();
        b.set(Metric::FirstToken, 14.0);
        b.set_text(Metric::BurstWall, "failed: timeout");
        b.set(Metric::Burst429, 0.0);
        b.set_text(Metric::IdleCpu, "not run: row not selected");
        let f = Figures::merge(vec![
            ("run 1 of 4".into(), a.clone()),
            ("run 4 of 4".into(), b),
        ]);
        assert_eq!(
            f.get(Metric::FirstToken).map(Cell::render),
            Some("12 (10–14)".into())
        );
        assert_eq!(f.value(Metric::FirstToken), Some(12.0));
        // The same in both runs: no range.
        assert_eq!(f.get(Metric::Burst429).map(Cell::render), Some("0".into()));
        assert_eq!(
            f.get(Metric::BurstWall).map(Cell::render),
            Some("run 1 of 4: 3; run 4 of 4: failed: timeout".into())
        );
        assert_eq!(
            f.get(Metric::IdleCpu).map(Cell::render),
            Some("not run: row not selected".into())
        );
        assert_eq!(f.notes, ["[run 1 of 4] one"]);
        let single = Figures::merge(vec![("run 1 of 2".into(), a)]);
        assert_eq!(single.value(Metric::FirstToken), Some(10.0));
        assert_eq!(single.notes, ["one"]);
    }

    #[test]
    fn the_chart_draws_values_and_escapes_text() {
        let svg = chart(&table());
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains(">1234</text>"), "{svg}");
        assert!(svg.contains("failed: a &lt;b&gt; | c"), "{svg}");
        assert!(!svg.contains("<b>"), "{svg}");
    }
}
