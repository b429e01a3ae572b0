//! Upstream v1.8.17's Go MIC on a [`MicWorld`]: the world's emulator (its
//! cloud files, trusting the emulator's CA), the admin kubeconfig, its leader
//! lock and ConfigMap in the world's namespace, probe and metrics on free
//! ports; for the tests that run it beside or instead of this project's MIC.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use aadpodid_tests::go_mic::GoMic;
//! use aadpodid_tests::mic_world::MicWorld;
//! let w = MicWorld::shared("MIGTEST", "go").build().await?;
//! let go = GoMic::spawn(&w, "go-mic-0", &["--leader-election-duration=4s"]).await?;
//! println!("{:?}", go.healthz().await);
//! # Ok(()) }
//! ```

use std::net::SocketAddr;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::free_ports;
use crate::http::http_get;
use crate::mic_world::{MicWorld, scrape};
use crate::tenant::{self, CloudEnvironment, MicCloud};
use crate::upstream::{MicOptions, UpstreamChild, spawn_upstream_mic};

/// Go MIC's ConfigMap (default name) and the key recording its one-time
/// type upgrade.
const CONFIG_MAP: &str = "aad-pod-identity-config";
const TYPE_UPGRADE_KEY: &str = "type-upgrade-status";

/// A running Go MIC; killed on drop.
#[derive(Debug)]
pub struct GoMic {
    pub child: UpstreamChild,
    /// `--http-probe-port` on loopback.
    pub probe: SocketAddr,
    /// `--prometheus-port` on loopback.
    pub metrics: SocketAddr,
}

impl GoMic {
    /// Starts Go MIC as `instance` with `extra_args` (upstream flags), after
    /// [`type_upgrade_done`]; it logs to a file of the world's folder.
    pub async fn spawn(w: &MicWorld, instance: &str, extra_args: &[&str]) -> anyhow::Result<GoMic> {
        type_upgrade_done(w).await?;
        let files = tenant::write_mic_cloud_files(
            w.dir(),
            &format!("{instance}-{}-", w.ns.name()),
            &MicCloud::standard(),
            // go-autorest asks for tokens for the ARM endpoint itself.
            &CloudEnvironment {
                token_audience: None,
                ..CloudEnvironment::of(&w.emu)
            },
        )?;
        let [probe, metrics] = free_ports()?;
        let child = spawn_upstream_mic(
            &MicOptions {
                kubeconfig: w.cluster().kubeconfig().to_path_buf(),
                azure_json: files.azure_json,
                cloud_env_file: files.environment,
                ca_bundle: w.emu.ca_bundle_path().to_path_buf(),
                namespace: w.ns.name().into(),
                instance: instance.into(),
                probe_port: probe,
                metrics_port: metrics,
                extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            },
            &w.dir().join(format!("{instance}-{}.log", w.ns.name())),
        )?;
        Ok(GoMic {
            child,
            probe: SocketAddr::from(([127, 0, 0, 1], probe)),
            metrics: SocketAddr::from(([127, 0, 0, 1], metrics)),
        })
    }

    /// `/healthz` (`Active` once it leads and its sync loop runs, `Not
    /// Active` before); `None` while nothing answers.
    pub async fn healthz(&self) -> Option<String> {
        http_get(self.probe, "/healthz").await.ok()
    }

    pub async fn active(&self) -> bool {
        self.healthz().await.as_deref() == Some("Active")
    }

    /// The value of series `name` on its `/metrics` (0 when absent or when
    /// nothing answers).
    pub async fn metric(&self, name: &str) -> f64 {
        scrape(self.metrics, name).await
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        self.child.log()
    }

    /// The last 40 lines of its log, without client-go's warning at each
    /// renewal of the Endpoints lock.
    pub fn tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains("Endpoints is deprecated"))
            .collect();
        format!(
            "--- Go mic log (tail) ---\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }
}

/// Records Go MIC's one-time type upgrade as done in the world's namespace
/// (as in a cluster that ran it before): otherwise, once leading, it
/// rewrites every identity, binding and AAI of the cluster. Idempotent.
pub async fn type_upgrade_done(w: &MicWorld) -> anyhow::Result<()> {
    let cms = Api::<ConfigMap>::namespaced(w.client().await?, w.ns.name());
    if cms.get_opt(CONFIG_MAP).await?.is_some() {
        return Ok(());
    }
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIG_MAP.into()),
            ..Default::default()
        },
        data: Some([(TYPE_UPGRADE_KEY.to_string(), "v1.8.17".to_string())].into()),
        ..Default::default()
    };
    cms.create(&PostParams::default(), &cm)
        .await
        .context("create Go MIC's ConfigMap")?;
    Ok(())
}
