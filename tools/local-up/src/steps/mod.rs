//! The demo's steps, one module each, in the order [`demo`] runs them. Each
//! step prints its numbered title, what it did, and how long it took; the
//! parts are the test kit's world, built one step at a time
//! ([`WorldBuilder`]) inside the [`Registry`](crate::registry::Registry), so
//! the teardown finds them.
//!
//! | step | module | what |
//! | --- | --- | --- |
//! | - | [`setup`] | the introduction, the root check, the run's folder |
//! | 1 | [`cluster`] | the test kit's etcd + kube-apiserver |
//! | 2 | [`emulator`] | the Azure emulator with the demo's tenant; mic's files |
//! | 3 | [`nodes`] | Node objects for the emulated machines, their namespaces |
//! | 4 | [`mic`] | two mic replicas and the leader Lease |
//! | 5 | [`nmi`] | one nmi per node, in the node's network namespace |
//! | 6 | [`manifests`] | the seed manifests, applied with `kubectl apply`; the federated identity ([`federated`]) |
//! | 7 | [`pods`] | the seed pods and the federated one, scheduled; their identities assigned, first tokens timed |
//! | 8 | [`tokens`] | a real Azure SDK client in each pod gets a token; the sources side by side |
//! | - | [`keep`] | with `--keep`: everything stays up until a signal |
//! | 9 | [`release`] | the pods deleted; their identities released |

pub mod cluster;
pub mod emulator;
pub mod federated;
pub mod keep;
pub mod manifests;
pub mod mic;
pub mod nmi;
pub mod nodes;
pub mod pods;
pub mod release;
pub mod setup;
pub mod tokens;

use std::time::Duration;

use aadpodid_testkit::Cluster;
use aadpodid_testkit::world::{ArgsSource, Options, WorldBuilder};
use anyhow::{Context as _, bail};

use crate::Cli;
use crate::registry::Reg;
use crate::role::Role;

/// Bound on every wait of the demo.
pub const WAIT: Duration = Duration::from_secs(90);

/// Runs every step in order, building the world in the registry (where the
/// teardown finds it however the steps end).
pub async fn demo(registry: &Reg, cli: &Cli) -> anyhow::Result<()> {
    let dir = setup::prepare()?;
    let opts = Options::with_programs(Role::Mic.program()?, Role::Nmi.program()?);
    let mut slot = registry.world.lock().await;
    let world = slot.insert(WorldBuilder::new(opts, ArgsSource::Flags, dir)?);
    cluster::start(world).await?;
    emulator::start(world).await?;
    nodes::create(world).await?;
    mic::start(world).await?;
    nmi::start(world).await?;
    let cluster = world
        .shared_cluster()
        .context("the demo runs on the shared cluster")?;
    let seeds = manifests::apply(cluster, world.emu()?).await?;
    let pods = pods::run(cluster, world, &seeds).await?;
    tokens::show(world, &pods).await?;
    if cli.keep {
        keep::until_signal(registry, cluster, &pods, world.dir()).await?;
    }
    release::delete_pods(world.client()?, world.emu()?, &pods).await
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
