//! `local-up`: the whole system on one machine, step by step, for a newcomer.
//!
//! It brings up, step by step with the test kit's world builder
//! ([`aadpodid_testkit::world::WorldBuilder`]), the kit's shared cluster
//! (etcd + kube-apiserver), the Azure emulator with a small tenant, two mic
//! replicas and one nmi per node (each node a network namespace), mic and nmi
//! started from plain flags, applies the user's seed manifests with a real
//! `kubectl apply`, starts the seeds' two pods (one on a scale-set node, one on
//! the VM) and a third whose AzureIdentity is federated (annotated
//! `aadpodidentity.k8s.io/token-source: federated`; the emulated Entra ID
//! trusts the test apiserver's ServiceAccount issuer), and shows their
//! identities being assigned (the federated one with no ARM write), a real
//! Azure SDK client in each pod getting a token through 169.254.169.254, the
//! pods side by side (source, time to first token, ARM writes, claims), and
//! the identities released when the pods go. Everything is torn down at the end or on
//! SIGINT/SIGTERM. Needs root (network namespaces, iptables inside them).
//!
//! mic and nmi are this same binary re-executed in a [`role`], so the demo is
//! one program: `cargo build -p aadpodid-local-up --bin local-up` builds all
//! of it.
//!
//! Network layout: the apiserver and the emulator listen on loopback in the
//! root namespace; inside each node namespace (and each mic replica's) the
//! test kit's relay carries the same `127.0.0.1:<port>` (and the node's
//! `169.254.169.254:80`, that machine's IMDS) over Unix sockets to them. Unix
//! sockets are not network-namespaced, so nothing is added to the root
//! namespace's network.
//!
//! # Modules
//!
//! | module | what |
//! | --- | --- |
//! | [`steps`] | the nine numbered steps, one module each, in the order they run |
//! | [`tenant`] | the emulated tenant: machines, identities, mic's service principal, reading ARM |
//! | [`role`] | mic and nmi as this binary re-executed |
//! | [`registry`] | the world being built, and the teardown that undoes it |
//! | [`leftovers`] | what a run could leave behind (the kit's helpers) |
//! | [`say`] | the numbered, timed output |

pub mod leftovers;
pub mod registry;
pub mod role;
pub mod say;
pub mod steps;
pub mod tenant;

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser as _;

use crate::registry::{Reg, STOPPING, is_keeping, print_logs, teardown};

/// Runs aad-pod-identity locally: test cluster, Azure emulator, mic, nmi and pods getting tokens
#[derive(clap::Parser, Debug)]
#[command(name = "local-up")]
pub struct Cli {
    /// Keep everything running after the token step (the pods stay) until Ctrl-C.
    #[arg(long)]
    pub keep: bool,
}

/// The program: mic or nmi when re-executed in a [`role`], else the demo.
pub fn main() -> ExitCode {
    match role::Role::of_this_process() {
        Ok(Some(role)) => return role.run(),
        Ok(None) => {}
        Err(e) => {
            eprintln!("local-up: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("local-up: cannot start the Tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Failures of half-started parts are expected while stopping.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !STOPPING.load(Ordering::SeqCst) {
            default_hook(info);
        }
    }));
    rt.block_on(run(cli))
}

/// How the demo ended.
enum Outcome {
    /// All steps ran (or failed).
    Ran(anyhow::Result<()>),
    /// A signal stopped it (its name).
    Signal(&'static str),
}

/// Runs the steps until they end or a signal comes, then tears down.
async fn run(cli: Cli) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!("local-up: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    let registry: Reg = Reg::default();
    let started = Instant::now();
    let mut outcome = tokio::select! {
        biased;
        _ = int.recv() => Outcome::Signal("SIGINT"),
        _ = term.recv() => Outcome::Signal("SIGTERM"),
        r = steps::demo(&registry, &cli) => Outcome::Ran(r),
    };
    // Ctrl-C reaches the whole process group: a child may die of it and fail
    // the demo a moment before this process sees the signal. Then the signal,
    // not the failure, is the story.
    if matches!(outcome, Outcome::Ran(Err(_))) {
        let late = tokio::time::timeout(Duration::from_millis(500), async {
            tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            }
        })
        .await;
        if let Ok(sig) = late {
            outcome = Outcome::Signal(sig);
        }
    }
    STOPPING.store(true, Ordering::SeqCst);
    let code = match &outcome {
        Outcome::Ran(Ok(())) => ExitCode::SUCCESS,
        Outcome::Ran(Err(e)) => {
            println!("\nlocal-up FAILED: {e:#}");
            print_logs(&registry);
            ExitCode::FAILURE
        }
        Outcome::Signal(sig) if is_keeping(&registry) => {
            println!("\n{sig} received: stopping.");
            ExitCode::SUCCESS
        }
        Outcome::Signal(sig) => {
            println!("\n{sig} received: stopping early.");
            ExitCode::from(if *sig == "SIGINT" { 130 } else { 143 })
        }
    };
    teardown(&registry).await;
    if matches!(outcome, Outcome::Ran(Ok(()))) {
        println!(
            "\nDone in {:.1}s. Run it again any time: scripts/local-up.sh",
            started.elapsed().as_secs_f64()
        );
    }
    code
}
