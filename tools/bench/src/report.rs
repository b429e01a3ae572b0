//! The table (text and Markdown), the machine it ran on, and the SVG chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use aadpodid_testkit::flood::Kind;
use aadpodid_testkit::procfs;

use crate::{Scale, Subject};

/// One line of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    FirstToken,
    BurstEmulated,
    BurstWall,
    BurstWrites,
    BurstReads,
    BurstPolls,
    Burst429,
    TokenP50,
    TokenP99,
    TokenThroughput,
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
}

impl Metric {
    /// Every metric, in table order.
    pub const ALL: [Metric; 33] = [
        Metric::FirstToken,
        Metric::BurstEmulated,
        Metric::BurstWall,
        Metric::BurstWrites,
        Metric::BurstReads,
        Metric::BurstPolls,
        Metric::Burst429,
        Metric::TokenP50,
        Metric::TokenP99,
        Metric::TokenThroughput,
        Metric::NmiRestRss,
        Metric::NmiRestFds,
        Metric::NmiPeakRss,
        Metric::NmiPodsFds,
        Metric::FloodRss(Kind::SlowBodies),
        Metric::FloodFds(Kind::SlowBodies),
        Metric::FloodVictim(Kind::SlowBodies),
        Metric::FloodRss(Kind::DistinctResources),
        Metric::FloodFds(Kind::DistinctResources),
        Metric::FloodVictim(Kind::DistinctResources),
        Metric::FloodRss(Kind::IdleConnections),
        Metric::FloodFds(Kind::IdleConnections),
        Metric::FloodVictim(Kind::IdleConnections),
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

    /// Row of the table (1-6).
    pub fn row(self) -> u8 {
        match self {
            Metric::FirstToken => 1,
            Metric::BurstEmulated
            | Metric::BurstWall
            | Metric::BurstWrites
            | Metric::BurstReads
            | Metric::BurstPolls
            | Metric::Burst429 => 2,
            Metric::TokenP50 | Metric::TokenP99 | Metric::TokenThroughput => 3,
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
        }
    }

    /// What the line says, with the run's sizes.
    pub fn label(self, s: &Scale) -> String {
        match self {
            Metric::FirstToken => format!(
                "first token for a new pod, minus the LRO (L = {:.0} s emulated = {:.1} s wall), ms",
                s.lro_seconds,
                s.lro_seconds / s.speed
            ),
            Metric::BurstEmulated => format!(
                "burst of {} pods / {} identities / {} scale sets: all Assigned, emulated s",
                s.burst_pods, s.burst_ids, s.vmss
            ),
            Metric::BurstWall => "burst: all Assigned, wall s".into(),
            Metric::BurstWrites => "burst: ARM writes (PUT/PATCH)".into(),
            Metric::BurstReads => "burst: ARM reads (GET of VMSS/VM)".into(),
            Metric::BurstPolls => "burst: ARM LRO status polls".into(),
            Metric::Burst429 => "burst: ARM 429 answers".into(),
            Metric::TokenP50 => format!(
                "NMI token p50 at {} concurrent clients (cached), ms",
                s.load_clients
            ),
            Metric::TokenP99 => "NMI token p99, ms".into(),
            Metric::TokenThroughput => "NMI token throughput, tokens/s".into(),
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
        }
    }
}

/// A measured value, or why there is none.
#[derive(Clone, Debug)]
pub enum Cell {
    Value(f64),
    Text(String),
}

impl Cell {
    /// As printed.
    pub fn render(&self) -> String {
        match self {
            Cell::Value(v) => format_number(*v),
            Cell::Text(t) => t.clone(),
        }
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
        for m in Metric::ALL {
            self.cells
                .entry(m)
                .or_insert_with(|| Cell::Text(t.to_string()));
        }
    }

    pub fn get(&self, m: Metric) -> Option<&Cell> {
        self.cells.get(&m)
    }

    /// The numeric value of `m`, if measured.
    pub fn value(&self, m: Metric) -> Option<f64> {
        match self.cells.get(&m) {
            Some(Cell::Value(v)) => Some(*v),
            _ => None,
        }
    }
}

/// The whole result of a run.
#[derive(Clone, Debug)]
pub struct Table {
    pub scale: Scale,
    pub columns: Vec<(Subject, Figures)>,
    /// Rows left out of the table and the chart (not run in this mode).
    pub hidden_rows: Vec<u8>,
}

impl Table {
    pub fn new(scale: &Scale, columns: Vec<(Subject, Figures)>) -> Self {
        Table {
            scale: scale.clone(),
            columns,
            hidden_rows: Vec::new(),
        }
    }

    /// The metrics shown, in table order.
    fn metrics(&self) -> Vec<Metric> {
        Metric::ALL
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
            let r: Vec<String> = r.into_iter().map(|c| c.replace('|', "/")).collect();
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
}

impl Machine {
    /// Reads `/proc`, `date` and the Git commit of the work tree (read-only).
    pub fn describe(took: Duration, quick: bool) -> Self {
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
        "- One process starts a real etcd + kube-apiserver (the test harness) and, per column, the Azure emulator in-process with Compute's throttle buckets at their real sizes (PutVMScaleSet: 12 burst, 4/min per scale set; 1500/500 per subscription; ARM 250 reads/200 writes burst) on a clock running {speed}× (1 wall s = {speed} emulated s). VMSS writes are long-running operations of {lro} emulated s; `Retry-After` is divided by the speed.\n\
         - mic runs as its own process (`mic::cli_main`) with its periods divided by {speed} (`--identity-assignment-reconcile-interval={ri}`, `--syncRetryDuration={sr}`, `--update-user-msi-retry-interval={ui}`) and its write budget refills multiplied by {speed}; lease timings stay real.\n\
         - nmi runs as its own process (`nmi::cli_main`) inside a node network namespace with its iptables rules; pods are network namespaces attached by veth; the apiserver and IMDS reach the node namespace over Unix-socket relays, never through the root namespace.\n\
         - Row 1: from creating the Pod (nodeName, then podIP via the status subresource) until `curl` in the pod's namespace gets 200 from 169.254.169.254, minus L in wall time.\n\
         - Row 2: pods are created 32 at a time while mic runs (Pod objects only, no kubelet); time until every AzureAssignedIdentity is Assigned (polled every 250 ms); ARM counts come from the emulator's counters over the same span.\n\
         - Row 3: {clients} HTTP/1.1 keep-alive clients in one pod namespace, {req} requests each (bounded by {max:.0} s), after one warm-up request, so NMI answers from its token cache; the client process runs on the same cores.\n\
         - Row 4: VmHWM of `/proc/<pid>/status`; descriptors are the entries of `/proc/<pid>/fd`. nmi at rest: VmRSS once active, before any pod is on its node. nmi with pods: {nmi} Pod objects with IPs and Assigned AAIs on its node, after a token request. mic: after the burst, the rest of {big} pods over {ids} identities (identity j on scale set j mod {k}) all Assigned.\n\
         - Row 4, floods: nmi is restarted before each flood; one pod (an ordinary pod with an Assigned identity) opens {flood} TCP connections to 169.254.169.254:80 (256 being opened at a time) and holds them at least {hold:.0} s: slow bodies = a token request per connection, each for its own `resource`, declaring `Content-Length: 65536` and sending nothing more; distinct resources = a complete token request per connection, each for its own `resource` (the emulator issues tokens for any resource); idle connections = nothing sent. Peak RSS is the larger of VmHWM and VmRSS sampled every 100 ms; peak descriptors are sampled every 100 ms. Meanwhile a second pod on the node asks for its first token for a resource nobody asked for yet (`curl`, 30 s at most); the details list what the flood got back and nmi's descriptors after it stopped.\n\
         - Row 5: after the burst converged and 60 emulated s of quiet, ARM requests (writes + reads + LRO polls) and mic's utime+stime from `/proc/<pid>/stat` over {idle:.0} emulated s ({idlew:.0} wall s).\n\
         - Row 6 (one run for both columns, the test kit's upgrade scenario, the one `tests/tests/migration_upgrade.rs` asserts on): a cluster of its own, two nodes (one per scale set) with two pods each asking for a token every 250 ms throughout, three identities, the emulator at 30×. Before Go starts, upstream's chart 4.1.18 is `helm install`ed; right before the processes are swapped this project's CRDs are applied and `helm upgrade` writes this chart, and `helm rollback` comes before the way back (mic and nmi run with the test kit's flags). Upstream's Go mic (two replicas) and Go nmi assign and serve first; then this project's nmi is started beside Go nmi on each node in turn, Go nmi gets SIGTERM once the new redirect is in place (surge), this project's two mic replicas start beside Go's and Go mic's replicas are stopped, standby first (the \"this project\" column); then back: on each node this project's nmi is stopped before Go nmi starts (delete first, as upstream's chart rolls), Go mic's replicas start beside ours and ours are stopped (the \"upstream\" column). Both mics have a 4 s leader lease. ARM writes come from the emulator's request log (sides told apart by the Compute api-version upstream's Go SDK sends), AzureAssignedIdentity changes from listing them every 100 ms, requests that reached IMDS around nmi from the node relay's log of each IMDS connection's peer.\n\
         - The machine is shared: other jobs ran on the same {cpus} cores during the run, so times and CPU figures are upper bounds.",
        speed = s.speed,
        lro = s.lro_seconds,
        ri = crate::subject::go_duration_text(s.wall(Duration::from_secs(180))),
        sr = crate::subject::go_duration_text(s.wall(Duration::from_secs(3600))),
        ui = crate::subject::go_duration_text(s.wall(Duration::from_secs(1))),
        clients = s.load_clients,
        req = s.load_requests,
        max = s.load_max.as_secs_f64(),
        nmi = s.nmi_pods,
        big = s.big_pods,
        ids = s.big_ids,
        k = s.vmss,
        flood = s.flood_connections,
        hold = s.flood_hold.as_secs_f64(),
        idle = s.idle.as_secs_f64(),
        idlew = s.wall(s.idle).as_secs_f64(),
        cpus = m.cpus,
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
        match f.get(m) {
            Some(Cell::Value(v)) => {
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
                    format_number(*v)
                );
            }
            other => {
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
        ours.set_text(Metric::IdleCpu, "failed: a <b> | c");
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
        assert_eq!(lines.len(), 2 + Metric::ALL.len());
        let mut without = table();
        without.hidden_rows = vec![6];
        let shown = without.render_text().lines().count();
        assert_eq!(
            shown,
            2 + Metric::ALL.iter().filter(|m| m.row() != 6).count()
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
        assert!(idle.contains("failed: a <b> / c"), "{idle}");
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
