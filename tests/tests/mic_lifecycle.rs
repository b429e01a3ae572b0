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
use aadpodid_tests::{Cluster, TempNamespace, unique_name, wait_for};
use azure_emulator::config::{
    IdentityAssignmentSeed, IdentitySeed, PermissionsSeed, ScaleSetSeed, SecretSeed,
    ServicePrincipalSeed, VmSeed,
};
use azure_emulator::{Config, Emulator, TestCa};
use clap::Parser as _;
use k8s_openapi::api::core::v1::{Container, Node, NodeSpec, Pod, PodSpec};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

const CHILD_ENV: &str = "MICTEST_CHILD";
const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const SUB: &str = "0b1f6471-1bf0-4dda-aec3-cb9272f09590";
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
    let dir = std::env::temp_dir().join(unique_name("mictest"));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = TestCa::generate().unwrap();
    let (cert, key, bundle) = (
        dir.join("ca.pem"),
        dir.join("ca-key.pem"),
        dir.join("bundle.pem"),
    );
    std::fs::write(&cert, ca.cert_pem()).unwrap();
    std::fs::write(&key, ca.key_pem()).unwrap();
    azure_emulator::tls::write_bundle(ca.cert_pem(), &bundle).unwrap();
    let child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["child_", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env("SSL_CERT_FILE", &bundle)
        .env("MICTEST_CA_CERT", &cert)
        .env("MICTEST_CA_KEY", &key)
        .env("MICTEST_DIR", &dir)
        .env_remove("AZURE_AUTHORITY_HOST")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(900), child)
        .await
        .expect("children finished within 15 minutes")
        .expect("child ran");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(out.status.success(), "children failed:\n{stdout}\n{stderr}");
    // Every child test must have run and passed in the child process.
    let ran = stdout
        .lines()
        .find(|l| l.starts_with("test result:"))
        .unwrap_or_default();
    assert!(
        ran.contains("8 passed; 0 failed"),
        "expected 8 child tests to pass:\n{stdout}"
    );
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
        let args = mic::args::Args::try_parse_from([
            "mic".to_string(),
            format!("--cloudconfig={}", azure_json.display()),
            format!("--kubeconfig={}", self.cluster.kubeconfig().display()),
            format!("--leader-election-instance={instance}"),
            format!("--leader-election-namespace={}", self.ns.name()),
            "--leader-election-duration=4s".into(),
            "--identity-assignment-reconcile-interval=2s".into(),
            "--update-user-msi-retry-interval=100ms".into(),
        ])
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
        let shutdown = Shutdown::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(mic::run(
            self.settings(instance),
            shutdown.clone(),
            Some(tx),
        ));
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
    // Not a user-assigned identity ID: ignored (§9 statement 11).
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

    // Type 1: Assigned with no ARM write (§9 statement 10).
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
    // never removed when its last pod goes (§9 statement 27).
    w.identity("kubelet", &uai(NODE_RG, "kubelet"), KUBELET_CLIENT)
        .await;
    w.binding("b-kubelet", "kubelet", "kubelet-sel").await;
    w.pod("p2", "kubelet-sel", &w.nodes[1]).await;
    w.wait_assigned(&w.aai_name("p2", "kubelet")).await;
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
