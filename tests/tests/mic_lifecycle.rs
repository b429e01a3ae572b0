//! MIC against the real kube-apiserver and the Azure emulator over HTTPS.
//!
//! The Azure SDK trusts the emulator's test CA only through `SSL_CERT_FILE`,
//! which is process-wide and cannot be set from safe Rust once threads run.
//! So the one parent test writes a CA and a bundle, then re-runs this test
//! binary on the `child_` tests with the variable set; the children share one
//! cluster and run one at a time (each starts its own MIC, which watches the
//! whole cluster).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers outside #[test] functions fail the test by panicking"
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use aadpodid_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec,
    AzureIdentitySpec,
};
use aadpodid_runtime::Shutdown;
use aadpodid_tests::{
    Cluster, SUB, TENANT, TempNamespace, run_children_trusting_emulator_ca, unique_name, wait_for,
};
use azure_emulator::config::{
    IdentityAssignmentSeed, IdentitySeed, PermissionsSeed, ScaleSetSeed, SecretSeed,
    ServicePrincipalSeed, VmSeed,
};
use azure_emulator::faults::{Fault, FaultAction};
use azure_emulator::observe::Service;
use azure_emulator::{Config, Emulator};
use clap::Parser as _;
use k8s_openapi::api::core::v1::{Container, Node, NodeSpec, Pod, PodSpec};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

const CHILD_ENV: &str = "MICTEST_CHILD";
const NODE_RG: &str = "MC_rg_cluster_eastus";
const APP_RG: &str = "app-rg";
const MIC_CLIENT: &str = "5b1c2c4e-0000-4000-8000-00000000c1d1";
const MIC_SECRET: &str = "s3cr3t";
const KUBELET_CLIENT: &str = "c0000000-0000-4000-8000-00000000000k";
const APP_CLIENT: &str = "c0000000-0000-4000-8000-000000000001";
const WAIT: Duration = Duration::from_secs(90);

#[tokio::test]
async fn mic_against_cluster_and_emulator() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    run_children_trusting_emulator_ca("child_", "MICTEST", 16, Duration::from_secs(900))
        .await
        .unwrap();
}

/// One test's world: an emulator, a namespace, nodes, and MIC instances.
struct World {
    emu: Emulator,
    cluster: &'static Cluster,
    ns: TempNamespace,
    client: Client,
    dir: PathBuf,
    vmss: String,
    nodes: Vec<String>,
    /// A node on a standalone VM of the same name, with a system identity.
    vm_node: String,
}

fn uai(rg: &str, name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

fn ident(name: &str, rg: &str, client: &str) -> IdentitySeed {
    IdentitySeed {
        name: name.into(),
        resource_group: rg.into(),
        client_id: Some(client.into()),
        principal_id: None,
        federated_credentials: vec![],
        permissions: PermissionsSeed::default(),
    }
}

impl World {
    /// None outside the child process.
    async fn new(prefix: &str) -> Option<World> {
        Self::new_with(prefix, |_| {}).await
    }

    /// Like [`World::new`], with the emulator's config adjusted first.
    async fn new_with(prefix: &str, tweak: impl FnOnce(&mut Config)) -> Option<World> {
        let dir = PathBuf::from(std::env::var_os("MICTEST_DIR")?);
        let vmss = unique_name(&format!("{prefix}-vmss"));
        let vm_node = unique_name(&format!("{prefix}-vm"));
        let mut cfg = Config::new(TENANT, SUB);
        cfg.resource_groups = vec![NODE_RG.into(), APP_RG.into()];
        cfg.identities = vec![
            ident("kubelet", NODE_RG, KUBELET_CLIENT),
            ident("app-id", APP_RG, APP_CLIENT),
            ident("app-2", APP_RG, "c0000000-0000-4000-8000-000000000002"),
        ];
        cfg.scale_sets = vec![ScaleSetSeed {
            name: vmss.clone(),
            resource_group: NODE_RG.into(),
            instances: vec!["0".into(), "1".into()],
            identity: IdentityAssignmentSeed {
                system_assigned: false,
                user_assigned: vec!["kubelet".into()],
            },
        }];
        cfg.virtual_machines = vec![VmSeed {
            name: vm_node.clone(),
            resource_group: NODE_RG.into(),
            identity: IdentityAssignmentSeed {
                system_assigned: true,
                user_assigned: vec![],
            },
        }];
        cfg.service_principals = vec![ServicePrincipalSeed {
            client_id: MIC_CLIENT.into(),
            object_id: None,
            secrets: vec![SecretSeed::Plain(MIC_SECRET.into())],
            certificates: vec![],
            federated_credentials: vec![],
            permissions: PermissionsSeed::default(),
        }];
        // 100x: a 45 s scale-set write takes 0.45 s.
        cfg.clock.speed = 100.0;
        cfg.listen.ca_cert_pem_file = std::env::var_os("MICTEST_CA_CERT").map(Into::into);
        cfg.listen.ca_key_pem_file = std::env::var_os("MICTEST_CA_KEY").map(Into::into);
        tweak(&mut cfg);
        let emu = Emulator::start(cfg).await.expect("emulator starts");
        let cluster = Cluster::shared();
        let ns = cluster.temp_namespace(prefix).await.unwrap();
        let client = cluster.admin_client().await.unwrap();
        let mut w = World {
            emu,
            cluster,
            ns,
            client,
            dir,
            vmss,
            nodes: vec![],
            vm_node,
        };
        for i in 0..2 {
            let name = unique_name(&format!("{prefix}-node{i}"));
            w.create_node(&name, i).await;
            w.nodes.push(name);
        }
        let vm = Node {
            metadata: ObjectMeta {
                name: Some(w.vm_node.clone()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                provider_id: Some(format!(
                    "azure:///subscriptions/{SUB}/resourceGroups/{NODE_RG}/providers/Microsoft.Compute/virtualMachines/{}",
                    w.vm_node
                )),
                ..Default::default()
            }),
            ..Default::default()
        };
        Api::<Node>::all(w.client.clone())
            .create(&PostParams::default(), &vm)
            .await
            .unwrap();
        Some(w)
    }

    async fn create_node(&self, name: &str, instance: usize) {
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                provider_id: Some(format!(
                    "azure:///subscriptions/{SUB}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachineScaleSets/{}/virtualMachines/{instance}",
                    NODE_RG.to_lowercase(),
                    self.vmss
                )),
                ..Default::default()
            }),
            ..Default::default()
        };
        Api::<Node>::all(self.client.clone())
            .create(&PostParams::default(), &node)
            .await
            .unwrap();
    }

    /// Writes azure.json and the custom-cloud file that point MIC at the
    /// emulator, and resolves settings through MIC's own flag parsing.
    fn settings(&self, instance: &str) -> mic::Settings {
        self.settings_with(instance, &[], None)
    }

    /// Settings with extra flags and, when given, another kubeconfig.
    fn settings_with(
        &self,
        instance: &str,
        extra: &[&str],
        kubeconfig: Option<&std::path::Path>,
    ) -> mic::Settings {
        let env_file = self
            .dir
            .join(format!("{instance}-{}-cloud.json", self.ns.name()));
        std::fs::write(
            &env_file,
            json!({
                "name": "AzureStackCloud",
                "resourceManagerEndpoint": self.emu.arm_url(),
                "activeDirectoryEndpoint": self.emu.aad_url(),
                "tokenAudience": "https://management.azure.com/",
            })
            .to_string(),
        )
        .unwrap();
        let azure_json = self
            .dir
            .join(format!("{instance}-{}-azure.json", self.ns.name()));
        std::fs::write(
            &azure_json,
            json!({
                "cloud": "AzureStackCloud",
                "tenantId": TENANT,
                "aadClientId": MIC_CLIENT,
                "aadClientSecret": MIC_SECRET,
                "subscriptionId": SUB,
                "resourceGroup": NODE_RG,
                "vmType": "vmss",
                "userAssignedIdentityID": KUBELET_CLIENT,
            })
            .to_string(),
        )
        .unwrap();
        let args = mic::args::Args::try_parse_from(
            [
                "mic".to_string(),
                format!("--cloudconfig={}", azure_json.display()),
                format!(
                    "--kubeconfig={}",
                    kubeconfig
                        .unwrap_or_else(|| self.cluster.kubeconfig())
                        .display()
                ),
                format!("--leader-election-instance={instance}"),
                format!("--leader-election-namespace={}", self.ns.name()),
                "--leader-election-duration=4s".into(),
                "--identity-assignment-reconcile-interval=2s".into(),
                "--update-user-msi-retry-interval=100ms".into(),
            ]
            .into_iter()
            .chain(extra.iter().map(|a| a.to_string())),
        )
        .unwrap();
        let ns = self.ns.name().to_string();
        let env_path = env_file.display().to_string();
        let env = move |k: &str| match k {
            "MIC_POD_NAMESPACE" => Some(ns.clone()),
            "AZURE_ENVIRONMENT_FILEPATH" => Some(env_path.clone()),
            _ => None,
        };
        let mut s = mic::Settings::from_args(&args, &env).unwrap();
        s.probe_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        s.metrics_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        s.arm.poll_interval = Duration::from_millis(200);
        s
    }

    async fn start_mic(&self, instance: &str) -> RunningMic {
        self.start_mic_with(self.settings(instance)).await
    }

    async fn start_mic_with(&self, settings: mic::Settings) -> RunningMic {
        let shutdown = Shutdown::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(mic::run(settings, shutdown.clone(), Some(tx)));
        let handles = tokio::time::timeout(Duration::from_secs(60), rx)
            .await
            .expect("MIC starts")
            .expect("MIC sent its handles");
        RunningMic {
            shutdown,
            task,
            handles,
        }
    }

    async fn identity(&self, name: &str, resource_id: &str, client_id: &str) {
        let mut id = AzureIdentity::new(
            name,
            AzureIdentitySpec {
                resource_id: resource_id.into(),
                client_id: client_id.into(),
                ..Default::default()
            },
        );
        id.metadata.namespace = Some(self.ns.name().into());
        Api::<AzureIdentity>::namespaced(self.client.clone(), self.ns.name())
            .create(&PostParams::default(), &id)
            .await
            .unwrap();
    }

    async fn binding(&self, name: &str, identity: &str, selector: &str) {
        let mut b = AzureIdentityBinding::new(
            name,
            AzureIdentityBindingSpec {
                azure_identity: identity.into(),
                selector: selector.into(),
                weight: 0,
            },
        );
        b.metadata.namespace = Some(self.ns.name().into());
        Api::<AzureIdentityBinding>::namespaced(self.client.clone(), self.ns.name())
            .create(&PostParams::default(), &b)
            .await
            .unwrap();
    }

    async fn pod(&self, name: &str, selector: &str, node: &str) {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(self.ns.name().into()),
                labels: Some([("aadpodidbinding".to_string(), selector.to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                containers: vec![Container {
                    name: "c".into(),
                    image: Some("example.invalid/app".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        Api::<Pod>::namespaced(self.client.clone(), self.ns.name())
            .create(&PostParams::default(), &pod)
            .await
            .unwrap();
    }

    async fn delete_pod(&self, name: &str) {
        // No kubelet runs, so delete at once (grace period 0).
        Api::<Pod>::namespaced(self.client.clone(), self.ns.name())
            .delete(name, &DeleteParams::default().grace_period(0))
            .await
            .unwrap();
    }

    fn aai_name(&self, pod: &str, identity: &str) -> String {
        format!("{pod}-{}-{identity}", self.ns.name())
    }

    async fn aai(&self, name: &str) -> Option<AzureAssignedIdentity> {
        Api::<AzureAssignedIdentity>::namespaced(self.client.clone(), "default")
            .get_opt(name)
            .await
            .unwrap()
    }

    async fn wait_assigned(&self, name: &str) -> AzureAssignedIdentity {
        wait_for(&format!("AAI {name} Assigned"), WAIT, || async {
            self.aai(name)
                .await
                .filter(|a| a.status.as_ref().is_some_and(|s| s.status == "Assigned"))
        })
        .await
        .unwrap()
    }

    /// Waits for the AAI to carry MIC's refusal; returns the reason. It
    /// must never be Assigned meanwhile.
    async fn wait_refused(&self, name: &str) -> String {
        let aai = wait_for(&format!("AAI {name} refused"), WAIT, || async {
            self.aai(name).await.filter(|a| {
                a.annotations()
                    .contains_key(aadpodid_api::ANNOTATION_ASSIGNMENT_ERROR)
            })
        })
        .await
        .unwrap();
        assert_eq!(
            aai.status.as_ref().map(|s| s.status.as_str()),
            Some("Created"),
            "a refused AAI is not Assigned"
        );
        aai.annotations()[aadpodid_api::ANNOTATION_ASSIGNMENT_ERROR].clone()
    }

    async fn wait_gone(&self, name: &str) {
        wait_for(&format!("AAI {name} deleted"), WAIT, || async {
            self.aai(name).await.is_none().then_some(())
        })
        .await
        .unwrap();
    }

    fn on_vmss(&self, name: &str) -> bool {
        self.emu
            .assigned_identities(&self.vmss)
            .unwrap_or_default()
            .contains(&uai(if name == "kubelet" { NODE_RG } else { APP_RG }, name).to_lowercase())
    }

    async fn wait_on_vmss(&self, name: &str, present: bool) {
        wait_for(
            &format!("{name} on the scale set = {present}"),
            WAIT,
            || async { (self.on_vmss(name) == present).then_some(()) },
        )
        .await
        .unwrap();
    }

    /// Removes this world's nodes so later tests' MICs ignore its leftovers.
    async fn cleanup(&self) {
        for n in self.nodes.iter().chain(std::iter::once(&self.vm_node)) {
            let _ = Api::<Node>::all(self.client.clone())
                .delete(n, &DeleteParams::default())
                .await;
        }
    }
}

struct RunningMic {
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<(), mic::RunError>>,
    handles: mic::Handles,
}

impl RunningMic {
    async fn stop(self) {
        self.shutdown.trigger();
        let r = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("MIC stops within 30 s")
            .expect("MIC task did not panic");
        r.expect("MIC ran without error");
    }

    async fn healthz(&self) -> String {
        http_get(self.handles.probe_addr, "/healthz").await
    }
}

/// A bounded plain-HTTP GET on loopback.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string()
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_pod_lifecycle_assigns_and_removes_the_identity() {
    let Some(w) = World::new("life").await else {
        panic!("needs the environment mic_against_cluster_and_emulator sets; run that test");
    };
    let mic = w.start_mic("mic-life").await;
    w.identity("app-id", &uai(APP_RG, "app-id"), APP_CLIENT)
        .await;
    w.binding("app-binding", "app-id", "life-sel").await;
    w.pod("web", "life-sel", &w.nodes[0]).await;

    let aai = w.wait_assigned(&w.aai_name("web", "app-id")).await;
    assert_eq!(aai.labels().get("nodename"), Some(&w.nodes[0]));
    assert!(
        aai.finalizers()
            .iter()
            .any(|f| f == aadpodid_api::ASSIGNED_IDENTITY_FINALIZER)
    );
    assert_eq!(aai.spec.pod, "web");
    assert!(
        w.on_vmss("app-id"),
        "identity on the scale set once Assigned"
    );
    assert!(mic.healthz().await == "Active");
    let metrics = http_get(mic.handles.metrics_addr, "/metrics").await;
    assert!(
        metrics.contains("aadpodidentity_assigned_identity_addition_count 1"),
        "{metrics}"
    );

    w.delete_pod("web").await;
    w.wait_gone(&w.aai_name("web", "app-id")).await;
    assert!(!w.on_vmss("app-id"), "identity removed before the AAI went");
    assert!(
        w.on_vmss("kubelet"),
        "the cluster identity is never touched"
    );

    mic.stop().await;
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_shared_identity_is_removed_after_the_last_pod() {
    let Some(w) = World::new("share").await else {
        panic!("needs the environment mic_against_cluster_and_emulator sets; run that test");
    };
    let mic = w.start_mic("mic-share").await;
    w.identity("app-id", &uai(APP_RG, "app-id"), APP_CLIENT)
        .await;
    w.binding("b", "app-id", "share-sel").await;
    w.pod("a", "share-sel", &w.nodes[0]).await;
    w.pod("b", "share-sel", &w.nodes[1]).await;
    w.wait_assigned(&w.aai_name("a", "app-id")).await;
    w.wait_assigned(&w.aai_name("b", "app-id")).await;

    w.delete_pod("a").await;
    w.wait_gone(&w.aai_name("a", "app-id")).await;
    assert!(
        w.on_vmss("app-id"),
        "pod b on the same scale set still uses it"
    );

    w.delete_pod("b").await;
    w.wait_gone(&w.aai_name("b", "app-id")).await;
    w.wait_on_vmss("app-id", false).await;

    mic.stop().await;
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_malformed_identity_does_not_stop_the_controller() {
    let Some(w) = World::new("bad").await else {
        panic!("needs the environment mic_against_cluster_and_emulator sets; run that test");
    };
    let mic = w.start_mic("mic-bad").await;
    // Not a user-assigned identity ID: ignored, as upstream.
    w.identity("broken", "/subscriptions/nope", APP_CLIENT)
        .await;
    w.binding("b-broken", "broken", "bad-sel").await;
    // Does not parse as an AzureIdentity at all: replicas is not an int32.
    let raw = json!({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
        "metadata": {"name": "unparseable", "namespace": w.ns.name()},
        "spec": {"type": 0, "replicas": 99999999999i64, "clientID": "x"}
    });
    let out = w
        .cluster
        .kubectl_run(&["apply", "-f", "-"], Some(&raw.to_string()))
        .unwrap();
    eprintln!(
        "unparseable identity accepted by the apiserver: {}",
        out.success
    );
    w.binding("b-unparseable", "unparseable", "bad-sel").await;

    w.identity("app-id", &uai(APP_RG, "app-id"), APP_CLIENT)
        .await;
    w.binding("b-good", "app-id", "bad-sel").await;
    w.pod("web", "bad-sel", &w.nodes[0]).await;
    w.wait_assigned(&w.aai_name("web", "app-id")).await;
    assert!(w.aai(&w.aai_name("web", "broken")).await.is_none());
    assert!(w.aai(&w.aai_name("web", "unparseable")).await.is_none());
    assert!(w.on_vmss("app-id"));

    // Still watching: a later change is still acted on.
    w.delete_pod("web").await;
    w.wait_gone(&w.aai_name("web", "app-id")).await;

    mic.stop().await;
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_drift_is_repaired() {
    let Some(w) = World::new("drift").await else {
        panic!("needs the environment mic_against_cluster_and_emulator sets; run that test");
    };
    let mic = w.start_mic("mic-drift").await;
    w.identity("app-id", &uai(APP_RG, "app-id"), APP_CLIENT)
        .await;
    w.binding("b", "app-id", "drift-sel").await;
    w.pod("web", "drift-sel", &w.nodes[0]).await;
    w.wait_assigned(&w.aai_name("web", "app-id")).await;
    // Someone removes it behind MIC's back.
    assert_eq!(w.emu.strip_identities(&w.vmss, Some(&["app-id"][..])), 1);
    assert!(!w.on_vmss("app-id"));
    w.wait_on_vmss("app-id", true).await;
    assert!(w.on_vmss("kubelet"));
    mic.stop().await;
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_leader_election_with_two_instances() {
    let Some(w) = World::new("lead").await else {
        panic!("needs the environment mic_against_cluster_and_emulator sets; run that test");
    };
    let a = w.start_mic("mic-a").await;
    let mut leading_a = a.handles.leading.clone();
    tokio::time::timeout(WAIT, leading_a.wait_for(|l| *l))
        .await
        .expect("mic-a leads")
        .unwrap();
    let b = w.start_mic("mic-b").await;
    wait_for("mic-a healthz Active", WAIT, || async {
        (a.healthz().await == "Active").then_some(())
    })
    .await
    .unwrap();
    assert_eq!(b.healthz().await, "Not Active");
    assert!(!*b.handles.leading.borrow());

    w.identity("app-id", &uai(APP_RG, "app-id"), APP_CLIENT)
        .await;
    w.binding("b", "app-id", "lead-sel").await;
    w.pod("one", "lead-sel", &w.nodes[0]).await;
    w.wait_assigned(&w.aai_name("one", "app-id")).await;
    assert!(!*b.handles.leading.borrow(), "the standby never took over");

    // The leader goes; the standby takes over and carries on.
    a.stop().await;
    let mut leading_b = b.handles.leading.clone();
    tokio::time::timeout(WAIT, leading_b.wait_for(|l| *l))
        .await
        .expect("mic-b takes over")
        .unwrap();
    wait_for("mic-b healthz Active", WAIT, || async {
        (b.healthz().await == "Active").then_some(())
    })
    .await
    .unwrap();
    w.identity(
        "app-2",
        &uai(APP_RG, "app-2"),
        "c0000000-0000-4000-8000-000000000002",
    )
    .await;
    w.binding("b2", "app-2", "lead-sel-2").await;
    w.pod("two", "lead-sel-2", &w.nodes[1]).await;
    w.wait_assigned(&w.aai_name("two", "app-2")).await;
    assert!(w.on_vmss("app-2"));

    b.stop().await;
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_service_principal_and_cluster_identity() {
    let Some(w) = World::new("sp").await else {
        panic!("needs the environment mic_against_cluster_and_emulator sets; run that test");
    };
    let mic = w.start_mic("mic-sp").await;
    let writes = |w: &World| w.emu.counters().arm_writes.values().sum::<u64>();

    // Type 1: Assigned with no ARM write, as upstream.
    let mut sp = AzureIdentity::new(
        "sp",
        AzureIdentitySpec {
            r#type: aadpodid_api::IdentityType::ServicePrincipal,
            client_id: "sp-client".into(),
            tenant_id: TENANT.into(),
            ..Default::default()
        },
    );
    sp.metadata.namespace = Some(w.ns.name().into());
    Api::<AzureIdentity>::namespaced(w.client.clone(), w.ns.name())
        .create(&PostParams::default(), &sp)
        .await
        .unwrap();
    w.binding("b-sp", "sp", "sp-sel").await;
    w.pod("p1", "sp-sel", &w.nodes[0]).await;
    w.wait_assigned(&w.aai_name("p1", "sp")).await;
    assert_eq!(writes(&w), 0, "no ARM write for a service principal");

    // The cluster identity of azure.json, referenced by an AzureIdentity, is
    // never removed when its last pod goes (as upstream), and (unlike
    // upstream) never served: its AAI stays Created with the reason.
    w.identity("kubelet", &uai(NODE_RG, "kubelet"), KUBELET_CLIENT)
        .await;
    w.binding("b-kubelet", "kubelet", "kubelet-sel").await;
    w.pod("p2", "kubelet-sel", &w.nodes[1]).await;
    let refused = w.wait_refused(&w.aai_name("p2", "kubelet")).await;
    assert!(refused.contains("--serve-cluster-identities"), "{refused}");
    w.delete_pod("p2").await;
    w.wait_gone(&w.aai_name("p2", "kubelet")).await;
    assert!(w.on_vmss("kubelet"));
    assert_eq!(
        writes(&w),
        0,
        "the kubelet identity was already there and stays"
    );

    mic.stop().await;
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_invalid_identity_does_not_hold_back_valid_ones() {
    let Some(w) = World::new("inv").await else {
        panic!("needs the environment mic_against_cluster_and_emulator sets; run that test");
    };
    let mic = w.start_mic("mic-inv").await;
    // Well-formed ID of an identity that does not exist: ARM refuses it
    // (FailedIdentityOperation) in the same batch as a valid one.
    w.identity(
        "ghost",
        &uai(APP_RG, "ghost"),
        "c0000000-0000-4000-8000-0000000000ff",
    )
    .await;
    w.identity("app-id", &uai(APP_RG, "app-id"), APP_CLIENT)
        .await;
    w.binding("b-ghost", "ghost", "inv-sel").await;
    w.binding("b-app", "app-id", "inv-sel").await;
    w.pod("web", "inv-sel", &w.nodes[0]).await;
    w.wait_assigned(&w.aai_name("web", "app-id")).await;
    assert!(w.on_vmss("app-id"));
    let ghost = w
        .aai(&w.aai_name("web", "ghost"))
        .await
        .expect("ghost AAI exists");
    assert_eq!(ghost.status.map(|s| s.status), Some("Created".into()));

    mic.stop().await;
    w.cleanup().await;
}

/// The e2e 429-storm scenario in small: the scale set's first reads and
/// writes are throttled, then the first PATCH that gets through carries an
/// identity the tenant does not have among valid ones and is refused
/// (FailedIdentityOperation). The write budget spaces PATCHes 15 s apart,
/// longer than the refused identity's first back-off, which used to put it
/// back into the next PATCH with the valid ones (refused again, and again).
/// Now the very next PATCH leaves it out and the valid identities land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_invalid_identity_after_a_throttle_storm_does_not_hold_back_valid_ones() {
    // The emulator's own buckets are off, so MIC's mirror alone spaces the
    // writes: 3 at once (2 throttled, 1 refused), then one per 15 s.
    let Some(w) = World::new_with("qstorm", |cfg| cfg.throttle.enabled = false).await else {
        panic!("needs the environment mic_against_cluster_and_emulator sets; run that test");
    };
    let mic = w
        .start_mic_with(w.settings_with(
            "mic-qstorm",
            &[
                "--arm-resource-write-burst=3",
                "--arm-resource-writes-per-minute=4",
            ],
            None,
        ))
        .await;
    let storm = |method: &str| {
        Fault::new(
            Service::Arm,
            FaultAction::Status {
                status: 429,
                retry_after: Some(1),
            },
        )
        .method(method)
        .path_contains(&w.vmss)
        .times(2)
    };
    w.emu.inject(storm("GET"));
    w.emu.inject(storm("PATCH"));
    w.identity(
        "ghost",
        &uai(APP_RG, "ghost"),
        "c0000000-0000-4000-8000-0000000000fe",
    )
    .await;
    w.identity("app-id", &uai(APP_RG, "app-id"), APP_CLIENT)
        .await;
    w.identity(
        "app-2",
        &uai(APP_RG, "app-2"),
        "c0000000-0000-4000-8000-000000000002",
    )
    .await;
    for (b, id) in [
        ("b-ghost", "ghost"),
        ("b-app", "app-id"),
        ("b-app2", "app-2"),
    ] {
        w.binding(b, id, "qstorm-sel").await;
    }
    w.pod("web", "qstorm-sel", &w.nodes[0]).await;
    w.wait_assigned(&w.aai_name("web", "app-id")).await;
    w.wait_assigned(&w.aai_name("web", "app-2")).await;
    assert!(w.on_vmss("app-id") && w.on_vmss("app-2"));
    assert!(!w.on_vmss("ghost"));

    // Answers to this scale set's PATCHes, in order: the storm's 429s, the
    // refusal (400), then the PATCH that landed the valid identities (200).
    let path = format!("/virtualmachinescalesets/{}?", w.vmss.to_lowercase());
    let answers: Vec<u16> = w
        .emu
        .requests(0)
        .iter()
        .filter(|r| r.method == "PATCH" && r.uri.to_lowercase().contains(&path))
        .map(|r| r.status)
        .collect();
    println!("qstorm: PATCH answers {answers:?}");
    assert_eq!(w.emu.counters().faults_fired, 4, "the whole storm was met");
    let after_storm: Vec<u16> = answers.iter().copied().filter(|s| *s != 429).collect();
    assert_eq!(
        after_storm.first(),
        Some(&400),
        "the first PATCH through carried the ghost: {answers:?}"
    );
    // The very next PATCH leaves the refused identity out and lands; before
    // the fix it carried the ghost again (400) until its back-off outgrew
    // the budget's spacing.
    assert_eq!(
        after_storm.get(1),
        Some(&200),
        "the next PATCH landed the valid identities: {answers:?}"
    );
    let ghost = w
        .aai(&w.aai_name("web", "ghost"))
        .await
        .expect("ghost AAI exists");
    assert_eq!(ghost.status.map(|s| s.status), Some("Created".into()));

    mic.stop().await;
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_standalone_vm_node_keeps_its_system_identity() {
    let Some(w) = World::new("vm").await else {
        panic!("needs the environment mic_against_cluster_and_emulator sets; run that test");
    };
    let mic = w.start_mic("mic-vm").await;
    w.identity("app-id", &uai(APP_RG, "app-id"), APP_CLIENT)
        .await;
    w.binding("b", "app-id", "vm-sel").await;
    w.pod("web", "vm-sel", &w.vm_node).await;
    w.wait_assigned(&w.aai_name("web", "app-id")).await;
    let on_vm = |w: &World| w.emu.assigned_identities(&w.vm_node).unwrap_or_default();
    assert_eq!(on_vm(&w), vec![uai(APP_RG, "app-id").to_lowercase()]);
    assert!(!w.on_vmss("app-id"), "the scale set is not touched");

    w.delete_pod("web").await;
    w.wait_gone(&w.aai_name("web", "app-id")).await;
    assert!(on_vm(&w).is_empty());
    assert_eq!(w.emu.has_system_identity(&w.vm_node), Some(true));

    mic.stop().await;
    w.cleanup().await;
}

/// ARM PATCHes the emulator received for this world's scale set, answered
/// or refused (injected faults included).
fn vmss_writes(w: &World) -> u64 {
    let path = format!("/virtualmachinescalesets/{}?", w.vmss.to_lowercase());
    w.emu
        .requests(0)
        .iter()
        .filter(|r| r.method == "PATCH" && r.uri.to_lowercase().contains(&path))
        .count() as u64
}

/// The value of an unlabelled counter on MIC's /metrics (0 when absent).
async fn metric(mic: &RunningMic, name: &str) -> f64 {
    http_get(mic.handles.metrics_addr, "/metrics")
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_throttle_storm_backs_off_and_stays_within_budget() {
    // The emulator's own buckets are off (no remaining-resource headers), so
    // MIC's mirror is the only limiter: 3 writes, then one per 100 s.
    let Some(w) = World::new_with("storm", |cfg| cfg.throttle.enabled = false).await else {
        panic!("needs the environment mic_against_cluster_and_emulator sets; run that test");
    };
    const BURST: u64 = 3;
    const PER_MINUTE: f64 = 0.6;
    let started = std::time::Instant::now();
    let mic = w
        .start_mic_with(w.settings_with(
            "mic-storm",
            &[
                "--arm-resource-write-burst=3",
                "--arm-resource-writes-per-minute=0.6",
            ],
            None,
        ))
        .await;
    // A 429 storm on this scale set's PATCHes, each with Retry-After: 1.
    w.emu.inject(
        Fault::new(
            Service::Arm,
            FaultAction::Status {
                status: 429,
                retry_after: Some(1),
            },
        )
        .method("PATCH")
        .path_contains(&w.vmss)
        .times(2),
    );
    w.identity("app-id", &uai(APP_RG, "app-id"), APP_CLIENT)
        .await;
    w.identity(
        "app-2",
        &uai(APP_RG, "app-2"),
        "c0000000-0000-4000-8000-000000000002",
    )
    .await;
    w.binding("b1", "app-id", "storm-sel").await;
    w.binding("b2", "app-2", "storm-sel").await;
    w.pod("web", "storm-sel", &w.nodes[0]).await;
    w.wait_assigned(&w.aai_name("web", "app-id")).await;
    w.wait_assigned(&w.aai_name("web", "app-2")).await;
    assert!(w.on_vmss("app-id") && w.on_vmss("app-2"));

    let c = w.emu.counters();
    let writes = vmss_writes(&w);
    eprintln!(
        "storm: writes={writes} throttled={} faults_fired={}",
        c.arm_throttled, c.faults_fired
    );
    assert_eq!(c.faults_fired, 2, "both 429s were met");
    assert!(c.arm_throttled >= 2);
    // The budget over the time MIC has run: burst plus refill.
    let allowed = BURST + (started.elapsed().as_secs_f64() * PER_MINUTE / 60.0).floor() as u64;
    assert!(
        writes <= allowed,
        "{writes} PATCHes exceed the budget of {allowed}"
    );
    assert_eq!(
        writes, 3,
        "two throttled PATCHes, then one carrying both identities"
    );

    // The budget is spent: the removal waits instead of provoking a 429.
    w.delete_pod("web").await;
    wait_for("a write deferred by the budget", WAIT, || async {
        (metric(&mic, "aadpodidentity_mic_arm_writes_deferred_count").await >= 1.0).then_some(())
    })
    .await
    .unwrap();
    let allowed = BURST + (started.elapsed().as_secs_f64() * PER_MINUTE / 60.0).floor() as u64;
    assert!(vmss_writes(&w) <= allowed);
    assert_eq!(
        w.emu.counters().arm_throttled,
        c.arm_throttled,
        "no new 429"
    );

    mic.stop().await;
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_failed_operation_keeps_created_then_converges() {
    // No emulator buckets; MIC's own budget spaces the retry (one per 10 s)
    // so the Created state after the failure is observable.
    let Some(w) = World::new_with("lro", |cfg| cfg.throttle.enabled = false).await else {
        panic!("needs the environment mic_against_cluster_and_emulator sets; run that test");
    };
    let mic = w
        .start_mic_with(w.settings_with(
            "mic-lro",
            &[
                "--arm-resource-write-burst=1",
                "--arm-resource-writes-per-minute=6",
            ],
            None,
        ))
        .await;
    // The next long-running operation ends Failed.
    w.emu.fail_next_operations(1);
    w.identity("app-id", &uai(APP_RG, "app-id"), APP_CLIENT)
        .await;
    w.binding("b", "app-id", "lro-sel").await;
    w.pod("web", "lro-sel", &w.nodes[0]).await;
    let name = w.aai_name("web", "app-id");
    wait_for("the failed update counted", WAIT, || async {
        http_get(mic.handles.metrics_addr, "/metrics")
            .await
            .contains(
                "aadpodidentity_cloud_provider_operations_errors_count{operation_type=\"vmss_update\"} 1",
            )
            .then_some(())
    })
    .await
    .unwrap();
    let aai = w.aai(&name).await.expect("AAI exists");
    assert_eq!(
        aai.status.map(|s| s.status),
        Some("Created".into()),
        "not Assigned after a failed operation"
    );
    // (The emulator, like ARM, keeps the requested identity in the model of
    // a scale set whose update failed; MIC does not take that as assigned.)

    // The fault is spent: the next PATCH lands.
    w.wait_assigned(&name).await;
    assert!(w.on_vmss("app-id"));
    assert!(
        w.emu.counters().lro_started >= 2,
        "retried after the failure"
    );

    mic.stop().await;
    w.cleanup().await;
}

/// The ClusterRole the chart ships for MIC (these rules are a copy of it).
fn mic_cluster_role(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [
            {"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["list", "watch"]},
            {"apiGroups": ["aadpodidentity.k8s.io"],
             "resources": ["azureidentities", "azureidentitybindings"],
             "verbs": ["list", "watch"]},
            {"apiGroups": ["aadpodidentity.k8s.io"],
             "resources": ["azureassignedidentities"],
             "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
             "verbs": ["get", "create", "update"]},
            {"apiGroups": ["", "events.k8s.io"], "resources": ["events"],
             "verbs": ["create", "patch"]},
        ],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_runs_with_the_chart_cluster_role_only() {
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    let Some(w) = World::new("rbac").await else {
        panic!("needs the environment mic_against_cluster_and_emulator sets; run that test");
    };
    let role_name = unique_name("aad-pod-identity-mic");
    let role: ClusterRole = serde_json::from_value(mic_cluster_role(&role_name)).unwrap();
    let roles = Api::<ClusterRole>::all(w.client.clone());
    roles.create(&PostParams::default(), &role).await.unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": role_name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
        "subjects": [{"kind": "ServiceAccount", "name": "mic", "namespace": w.ns.name()}],
    }))
    .unwrap();
    let bindings = Api::<ClusterRoleBinding>::all(w.client.clone());
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let kubeconfig = w
        .cluster
        .service_account_kubeconfig(w.ns.name(), "mic")
        .await
        .unwrap();
    // The account really is limited: nothing beyond the role.
    let sa = w
        .cluster
        .service_account_client(w.ns.name(), "mic")
        .await
        .unwrap();
    assert!(
        Api::<Secret>::namespaced(sa, w.ns.name())
            .list(&Default::default())
            .await
            .is_err(),
        "the ServiceAccount cannot read secrets"
    );

    // The ownership ledger lives in MIC's namespace: a Role there.
    let ledger_role: Role = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "mic-ledger", "namespace": w.ns.name()},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                   "verbs": ["get", "create", "update", "patch"]}],
    }))
    .unwrap();
    Api::<Role>::namespaced(w.client.clone(), w.ns.name())
        .create(&PostParams::default(), &ledger_role)
        .await
        .unwrap();
    let ledger_binding: RoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "mic-ledger", "namespace": w.ns.name()},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "mic-ledger"},
        "subjects": [{"kind": "ServiceAccount", "name": "mic", "namespace": w.ns.name()}],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(w.client.clone(), w.ns.name())
        .create(&PostParams::default(), &ledger_binding)
        .await
        .unwrap();
    let mic = w
        .start_mic_with(w.settings_with("mic-rbac", &[], Some(&kubeconfig)))
        .await;
    w.identity("app-id", &uai(APP_RG, "app-id"), APP_CLIENT)
        .await;
    w.binding("b", "app-id", "rbac-sel").await;
    w.pod("web", "rbac-sel", &w.nodes[0]).await;
    w.wait_assigned(&w.aai_name("web", "app-id")).await;
    assert!(w.on_vmss("app-id"));
    wait_for("healthz Active", WAIT, || async {
        (mic.healthz().await == "Active").then_some(())
    })
    .await
    .unwrap();
    w.delete_pod("web").await;
    w.wait_gone(&w.aai_name("web", "app-id")).await;
    assert!(!w.on_vmss("app-id"));

    mic.stop().await;
    let _ = bindings.delete(&role_name, &DeleteParams::default()).await;
    let _ = roles.delete(&role_name, &DeleteParams::default()).await;
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_lazy_removal_lingers_and_a_returning_pod_costs_no_write() {
    let Some(w) = World::new("linger").await else {
        panic!("needs the environment mic_against_cluster_and_emulator sets; run that test");
    };
    let mic = w
        .start_mic_with(w.settings_with("mic-linger", &["--identity-removal-linger=5s"], None))
        .await;
    w.identity("app-id", &uai(APP_RG, "app-id"), APP_CLIENT)
        .await;
    w.binding("b", "app-id", "cron-sel").await;
    w.pod("job-1", "cron-sel", &w.nodes[0]).await;
    w.wait_assigned(&w.aai_name("job-1", "app-id")).await;
    let writes = vmss_writes(&w);

    // The CronJob's next run comes while the identity lingers: no ARM write.
    w.delete_pod("job-1").await;
    w.pod("job-2", "cron-sel", &w.nodes[1]).await;
    w.wait_assigned(&w.aai_name("job-2", "app-id")).await;
    w.wait_gone(&w.aai_name("job-1", "app-id")).await;
    assert!(w.on_vmss("app-id"));
    assert_eq!(vmss_writes(&w), writes, "the returning pod needed no PATCH");

    // Nobody comes back: removed after the linger, with one PATCH.
    w.delete_pod("job-2").await;
    w.wait_gone(&w.aai_name("job-2", "app-id")).await;
    assert!(!w.on_vmss("app-id"), "removed before its AAI went");
    assert_eq!(vmss_writes(&w), writes + 1);

    mic.stop().await;
    w.cleanup().await;
}

/// The entitlement attacks of a namespace user, against MIC alone: forged
/// client IDs, the kubelet identity's resource ID (F6), and an identity that
/// was on the scale set before MIC. Nothing of the cluster's leaves the
/// scale set, and every refusal is visible on the AAI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_entitlement_refusals_and_ownership() {
    const APP2_CLIENT: &str = "c0000000-0000-4000-8000-000000000002";
    // app-2 is on the scale set before MIC starts (an add-on's identity).
    let Some(w) = World::new_with("own", |cfg| {
        cfg.scale_sets[0].identity.user_assigned = vec!["kubelet".into(), "app-2".into()];
    })
    .await
    else {
        panic!("needs the environment mic_against_cluster_and_emulator sets; run that test");
    };
    let mic = w.start_mic("mic-own").await;
    let node = w.nodes[0].clone();

    // 1. Another identity's resource ID with the kubelet identity's client
    // ID: refused before anything is sent.
    w.identity("forged", &uai(APP_RG, "app-id"), KUBELET_CLIENT)
        .await;
    w.binding("b-forged", "forged", "own-forged").await;
    w.pod("forged", "own-forged", &node).await;
    let why = w.wait_refused(&w.aai_name("forged", "forged")).await;
    assert!(why.contains("cluster's own identities"), "{why}");
    assert!(!w.on_vmss("app-id"), "the forged identity was never added");

    // 2. F6: the kubelet identity's resource ID with another client ID.
    w.identity("f6", &uai(NODE_RG, "kubelet"), APP_CLIENT).await;
    w.binding("b-f6", "f6", "own-f6").await;
    w.pod("f6", "own-f6", &node).await;
    let why = w.wait_refused(&w.aai_name("f6", "f6")).await;
    assert!(why.contains("cluster's own identities"), "{why}");

    // 3. A pre-existing identity with its true client ID: not served.
    w.identity("app-2", &uai(APP_RG, "app-2"), APP2_CLIENT)
        .await;
    w.binding("b-app2", "app-2", "own-pre").await;
    w.pod("pre", "own-pre", &node).await;
    let why = w.wait_refused(&w.aai_name("pre", "app-2")).await;
    assert!(why.contains("before MIC added it"), "{why}");

    // 4. A client ID that is not the resource ID's: MIC adds the identity
    // (it cannot know before), then refuses the AAI on ARM's word.
    w.identity("mismatch", &uai(APP_RG, "app-id"), APP2_CLIENT)
        .await;
    w.binding("b-mismatch", "mismatch", "own-mm").await;
    w.pod("mm", "own-mm", &node).await;
    let why = w.wait_refused(&w.aai_name("mm", "mismatch")).await;
    assert!(
        why.contains(&format!("Azure reports {APP_CLIENT}")),
        "{why}"
    );
    assert!(w.on_vmss("app-id"));

    // The ledger lists app-id only (MIC's own add), in MIC's namespace.
    let cm =
        Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(w.client.clone(), w.ns.name())
            .get("aad-pod-identity-mic-owned")
            .await
            .unwrap();
    let data = cm.data.unwrap_or_default();
    let entries = &data[&format!("vmss.{}", w.vmss.to_lowercase())];
    assert_eq!(
        entries.lines().count(),
        1,
        "one identity added by MIC: {data:?}"
    );
    let metrics = http_get(mic.handles.metrics_addr, "/metrics").await;
    for (reason, n) in [
        ("ClusterIdentityRefused", 3),
        ("IdentityClientIDMismatch", 1),
    ] {
        let line = format!("aadpodidentity_mic_identity_refused_count{{reason=\"{reason}\"}} {n}");
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
    // The refusals are Events on the AzureIdentities.
    let events =
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(w.client.clone(), w.ns.name());
    wait_for("the refusal Events", WAIT, || async {
        let list = events.list(&Default::default()).await.unwrap().items;
        let reasons: std::collections::BTreeSet<String> = list
            .iter()
            .filter(|e| {
                e.regarding
                    .as_ref()
                    .is_some_and(|r| r.kind.as_deref() == Some("AzureIdentity"))
            })
            .filter_map(|e| e.reason.clone())
            .collect();
        (reasons.contains("ClusterIdentityRefused") && reasons.contains("IdentityClientIDMismatch"))
            .then_some(())
    })
    .await
    .unwrap();

    // Every pod goes: only MIC's own add leaves; the kubelet identity and
    // the pre-existing one stay.
    for pod in ["forged", "f6", "pre", "mm"] {
        w.delete_pod(pod).await;
    }
    for (pod, id) in [
        ("forged", "forged"),
        ("f6", "f6"),
        ("pre", "app-2"),
        ("mm", "mismatch"),
    ] {
        w.wait_gone(&w.aai_name(pod, id)).await;
    }
    w.wait_on_vmss("app-id", false).await;
    assert!(w.on_vmss("kubelet"), "F6: the kubelet identity stays");
    assert!(w.on_vmss("app-2"), "the pre-existing identity stays");
    // The removal landed: its entry left the ledger.
    wait_for("the ledger emptied", WAIT, || async {
        let cm =
            Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(w.client.clone(), w.ns.name())
                .get("aad-pod-identity-mic-owned")
                .await
                .unwrap();
        cm.data.unwrap_or_default().is_empty().then_some(())
    })
    .await
    .unwrap();

    mic.stop().await;
    w.cleanup().await;
}

/// `--serve-cluster-identities` lets the kubelet identity be served (with
/// its true client ID); a MIC without it takes such an Assigned AAI back to
/// Created, as it does for one an earlier MIC (upstream's) marked Assigned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_serving_cluster_identities_is_opt_in_and_checked_again() {
    let Some(w) = World::new("serve").await else {
        panic!("needs the environment mic_against_cluster_and_emulator sets; run that test");
    };
    let mic = w
        .start_mic_with(w.settings_with("mic-serve", &["--serve-cluster-identities"], None))
        .await;
    w.identity("kubelet", &uai(NODE_RG, "kubelet"), KUBELET_CLIENT)
        .await;
    w.binding("b", "kubelet", "serve-sel").await;
    w.pod("p", "serve-sel", &w.nodes[0]).await;
    let name = w.aai_name("p", "kubelet");
    let aai = w.wait_assigned(&name).await;
    assert!(
        !aai.annotations()
            .contains_key(aadpodid_api::ANNOTATION_ASSIGNMENT_ERROR)
    );
    mic.stop().await;

    // Without the flag, the Assigned AAI is checked again and taken back.
    let mic = w.start_mic("mic-serve-2").await;
    let why = w.wait_refused(&name).await;
    assert!(why.contains("--serve-cluster-identities"), "{why}");
    w.delete_pod("p").await;
    w.wait_gone(&name).await;
    assert!(w.on_vmss("kubelet"), "never removed");
    mic.stop().await;
    w.cleanup().await;
}

/// The identity policy at run time: under `enforce` an identity not granted
/// to its namespace gets no AAI and an Event says why; granting it (the
/// Namespace annotation) assigns it; taking the grant away retires it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_identity_policy_enforce_and_warn() {
    use k8s_openapi::api::core::v1::Namespace;
    let Some(w) = World::new("policy").await else {
        panic!("needs the environment mic_against_cluster_and_emulator sets; run that test");
    };
    let mic = w
        .start_mic_with(w.settings_with("mic-policy", &["--identity-policy=enforce"], None))
        .await;
    w.identity("app-id", &uai(APP_RG, "app-id"), APP_CLIENT)
        .await;
    w.binding("b", "app-id", "policy-sel").await;
    w.pod("web", "policy-sel", &w.nodes[0]).await;
    let name = w.aai_name("web", "app-id");
    let events =
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(w.client.clone(), w.ns.name());
    let not_granted_events = || async {
        events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("IdentityNotGranted"))
            .count()
    };
    wait_for("the IdentityNotGranted Event", WAIT, || async {
        (not_granted_events().await >= 1).then_some(())
    })
    .await
    .unwrap();
    assert!(w.aai(&name).await.is_none(), "no AAI under enforce");
    assert!(!w.on_vmss("app-id"));

    // Granted by the cluster administrator: assigned.
    let namespaces = Api::<Namespace>::all(w.client.clone());
    let grant = |value: serde_json::Value| {
        json!({"metadata": {"annotations": {
            aadpodid_api::ANNOTATION_ALLOWED_IDENTITIES: value}}})
    };
    namespaces
        .patch(
            w.ns.name(),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(grant(json!(format!(
                "/subscriptions/{SUB}/resourceGroups/{APP_RG}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/*"
            )))),
        )
        .await
        .unwrap();
    w.wait_assigned(&name).await;
    assert!(w.on_vmss("app-id"));

    // The grant is taken away: retired, and removed (MIC added it).
    namespaces
        .patch(
            w.ns.name(),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(grant(serde_json::Value::Null)),
        )
        .await
        .unwrap();
    w.wait_gone(&name).await;
    w.wait_on_vmss("app-id", false).await;
    mic.stop().await;

    // warn: assigned anyway, with the Event.
    let before = not_granted_events().await;
    let mic = w
        .start_mic_with(w.settings_with("mic-policy-warn", &["--identity-policy=warn"], None))
        .await;
    w.wait_assigned(&name).await;
    wait_for("a new IdentityNotGranted Event", WAIT, || async {
        (not_granted_events().await > before).then_some(())
    })
    .await
    .unwrap();
    w.delete_pod("web").await;
    w.wait_gone(&name).await;
    mic.stop().await;
    w.cleanup().await;
}
