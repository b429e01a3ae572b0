//! The demo's steps, one module each, in the order [`demo`] runs them. Each
//! step prints its numbered title, what it did, and how long it took; each
//! registers what it starts in the [`Registry`](crate::registry::Registry)
//! before it can fail, so the teardown finds it.
//!
//! | step | module | what |
//! | --- | --- | --- |
//! | - | [`setup`] | the introduction, the root check, the run's folder |
//! | 1 | [`cluster`] | the test kit's etcd + kube-apiserver |
//! | 2 | [`emulator`] | the Azure emulator with the demo's tenant |
//! | 3 | [`nodes`] | Node objects for the emulated machines |
//! | 4 | [`mic`] | two mic replicas and the leader Lease |
//! | 5 | [`nmi`] | one nmi per node, in the node's network namespace |
//! | 6 | [`manifests`] | the seed manifests, applied with `kubectl apply` |
//! | 7 | [`pods`] | the seed pods, scheduled; their identities assigned |
//! | 8 | [`tokens`] | a real Azure SDK client in each pod gets a token |
//! | - | [`keep`] | with `--keep`: everything stays up until a signal |
//! | 9 | [`release`] | the pods deleted; their identities released |

pub mod cluster;
pub mod emulator;
pub mod keep;
pub mod manifests;
pub mod mic;
pub mod nmi;
pub mod nodes;
pub mod pods;
pub mod release;
pub mod setup;
pub mod tokens;

use std::process::Stdio;
use std::time::Duration;

use aadpodid_testkit::Cluster;
use anyhow::{Context as _, bail};

use crate::Cli;
use crate::registry::Reg;

/// Bound on every wait of the demo.
pub const WAIT: Duration = Duration::from_secs(90);

/// Runs every step in order.
pub async fn demo(registry: &Reg, cli: &Cli) -> anyhow::Result<()> {
    let dir = setup::prepare(registry)?;
    let (cluster, client) = cluster::start(registry).await?;
    let emu = emulator::start(registry).await?;
    let machines = nodes::create(&client).await?;
    mic::start(registry, &dir, cluster, &client, &emu).await?;
    let homes = nmi::start(registry, &dir, cluster, &emu, &machines).await?;
    let seeds = manifests::apply(cluster, &emu).await?;
    let pods = pods::run(cluster, &client, &emu, &seeds, &homes).await?;
    tokens::show(&emu, &pods).await?;
    if cli.keep {
        keep::until_signal(registry, cluster, &pods, &dir).await?;
    }
    release::delete_pods(&client, &emu, &pods).await
}

/// Polls `check` every 100 ms until it returns `Some`, at most [`WAIT`].
pub async fn wait<T, F, Fut>(what: &str, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    aadpodid_testkit::wait_for(what, WAIT, check).await
}

/// `kubectl apply -n NS -f -` with `manifest`; returns what kubectl printed.
pub async fn kubectl_apply(
    cluster: &'static Cluster,
    ns: &str,
    manifest: &str,
) -> anyhow::Result<String> {
    let (ns, manifest) = (ns.to_string(), manifest.to_string());
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            cluster.kubectl_run(&["apply", "-n", &ns, "-f", "-"], Some(&manifest))
        }),
    )
    .await
    .context("kubectl apply did not finish within 60 s")???;
    if !out.success {
        bail!("kubectl apply failed: {}", out.stderr);
    }
    Ok(out.stdout)
}

/// Starts `cmd` with its output in the log `name`.log under `dir`, and
/// registers it as `name` (its kind is the first word of the name).
pub fn spawn_logged(
    registry: &Reg,
    dir: &std::path::Path,
    name: &str,
    cmd: &mut std::process::Command,
) -> anyhow::Result<u32> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = cmd
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {name}"))?;
    let pid = child.id();
    crate::registry::reg(registry)
        .children
        .push((name.to_string(), child));
    Ok(pid)
}
