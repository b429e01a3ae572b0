//! MIC's behaviours that upstream v1.8.17 users rely on, against the real
//! kube-apiserver and the Azure emulator: azure.json re-read when it changes
//! (a rotated service-principal secret works without a restart, a bad
//! version keeps the configuration MIC had), upstream's `binding removed`
//! and `binding remove error` Events, the Compute api-version chosen per
//! cloud and by `--compute-api-version`, and `--clientQps` pacing MIC's
//! Kubernetes requests while watches go through.
//!
//! The children run in a process that trusts the emulator's test CA (see
//! `aadpodid_tests::mic_world`); the `--clientQps` test needs no emulator
//! and runs on its own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aadpodid_runtime::client::{RateLimit, kube_client_with_limit};
use aadpodid_tests::mic_world::{MicWorld, RunningMic, WAIT, wait_for_ok};
use aadpodid_tests::tenant::{APP_ID, APP2_ID, MIC_CLIENT, MicCloud};
use aadpodid_tests::{Cluster, wait_for};
use anyhow::Context as _;
use azure_emulator::config::SecretSeed;
use azure_emulator::observe::Service;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchParams};
use kube::core::WatchEvent;
use serde_json::json;

const ENV: &str = "COMPATTEST";

aadpodid_tests::emulator_ca_parent_test!(compat_against_cluster_and_emulator, "COMPATTEST", 3, 600);

/// The secret MIC's service principal has after the rotation; the one
/// MIC's azure.json starts with is no longer accepted.
const NEW_SECRET: &str = "r0tated-s3cr3t";

/// `--cloudconfig`'s value in MIC's command line.
fn cloudconfig(args: &[String]) -> anyhow::Result<PathBuf> {
    args.iter()
        .find_map(|a| a.strip_prefix("--cloudconfig="))
        .map(PathBuf::from)
        .context("--cloudconfig in MIC's command line")
}

/// `MIC` as the `e2e-mic` process with klog flags in Go's syntax and an
/// azure.json whose secret AAD no longer accepts: nothing is assigned until
/// the file is rewritten with the new secret, then the pod's identity is
/// assigned by the same process. A rewrite that is not a usable azure.json
/// is logged and the configuration before it stays in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by compat_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_rotated_secret_in_azure_json_works_without_restart() -> anyhow::Result<()> {
    let w = MicWorld::shared(ENV, "rotate")
        .tenant(|cfg| {
            for sp in cfg
                .service_principals
                .iter_mut()
                .filter(|sp| sp.client_id == MIC_CLIENT)
            {
                sp.secrets = vec![SecretSeed::Plain(NEW_SECRET.into())];
            }
        })
        .build()
        .await?;
    let instance = "mic-rotate";
    let azure_json = cloudconfig(&w.mic_command_line(instance, &[], None)?.args)?;
    let bin = Path::new(env!("CARGO_BIN_EXE_e2e-mic"));
    let klog = [
        "-log_dir=/nonexistent",
        "-vmodule=mic*=2",
        "--one_output",
        "-v",
        "0",
    ];
    let mic = w.spawn_mic_process(bin, instance, &klog)?;
    let log = || std::fs::read_to_string(&mic.log).unwrap_or_default();

    let a = w.bound_pod(APP_ID, "a", "rotate-a", &w.nodes[0]).await?;
    // MIC signs in with the old secret and AAD refuses it.
    wait_for("AAD refusing the old secret", WAIT, || async {
        (w.emu.counters().aad_errors >= 1).then_some(())
    })
    .await
    .with_context(|| mic.log_tail())?;
    let state = w.aai(&a).await?.and_then(|x| x.status).map(|s| s.status);
    assert_ne!(state.as_deref(), Some("Assigned"), "{}", mic.log_tail());
    let arm_writes_before: u64 = w.emu.counters().arm_writes.values().sum();
    assert_eq!(arm_writes_before, 0, "no ARM write without a token");

    // The rotation: the same file rewritten in place with the new secret.
    MicCloud {
        client_secret: NEW_SECRET.into(),
        ..MicCloud::standard()
    }
    .write(&azure_json)?;
    w.wait_assigned(&a).await.with_context(|| mic.log_tail())?;
    assert!(w.on_vmss(APP_ID));
    assert!(
        log().contains("azure.json changed: ARM client rebuilt from it"),
        "{}",
        mic.log_tail()
    );
    let aad_ok = w
        .emu
        .requests(0)
        .iter()
        .filter(|r| r.service == Service::Aad && r.status == 200)
        .count();
    assert!(aad_ok >= 1, "a token for the new secret");

    // A rewrite that is not an azure.json: logged, and the configuration
    // in use stays (the next pod, with another identity, is assigned).
    aadpodid_tests::tenant::replace_file(&azure_json, b"this is not an azure.json")?;
    let b = w.bound_pod(APP2_ID, "b", "rotate-b", &w.nodes[1]).await?;
    w.wait_assigned(&b).await.with_context(|| mic.log_tail())?;
    assert!(w.on_vmss(APP2_ID));
    let text = log();
    let refused: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains(
                "azure.json changed but is not usable; keeping the configuration read before",
            )
        })
        .collect();
    assert_eq!(refused.len(), 1, "reported once:\n{}", mic.log_tail());
    assert!(refused[0].contains("ERROR"), "{}", refused[0]);

    // One warning at start names the klog flags that have no effect.
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("klog flags accepted for compatibility have no effect"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", mic.log_tail());
    assert!(
        warnings[0].contains("--log_dir, --one_output, --vmodule"),
        "{}",
        warnings[0]
    );
    mic.terminate().await?;
    w.cleanup().await;
    Ok(())
}

/// A ValidatingAdmissionPolicy (and its binding, by the same name) that
/// refuses the deletion of AzureAssignedIdentity `aai` (they all live in
/// `default`; no other is touched).
async fn refuse_aai_deletion(client: &kube::Client, name: &str, aai: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    let policy: ValidatingAdmissionPolicy = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": ["aadpodidentity.k8s.io"],
                "apiVersions": ["*"],
                "operations": ["DELETE"],
                "resources": ["azureassignedidentities"],
            }]},
            "validations": [{
                "expression": format!("oldObject.metadata.name != '{aai}'"),
                "message": "deletion refused by the test",
            }],
        }
    }))?;
    let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {
                "kubernetes.io/metadata.name": "default",
            }}},
        }
    }))?;
    Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .create(&PostParams::default(), &policy)
        .await?;
    Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await?;
    Ok(())
}

async fn allow_aai_deletions(client: &kube::Client, name: &str) {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    let _ = Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await;
    let _ = Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await;
}

/// The Events about binding `binding` with `reason`: (type, note).
async fn binding_events(
    events: &Api<Event>,
    binding: &str,
    reason: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    Ok(events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter(|e| {
            e.regarding.as_ref().is_some_and(|r| {
                r.kind.as_deref() == Some("AzureIdentityBinding")
                    && r.name.as_deref() == Some(binding)
            })
        })
        .map(|e| (e.type_.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect())
}

/// A node that is gone: MIC deletes its pods' AzureAssignedIdentities and
/// says so with upstream's Events on the binding; `binding remove error`
/// while the apiserver refuses the deletion, `binding removed` once it
/// takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by compat_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_node_gone_events_as_upstream() -> anyhow::Result<()> {
    let w = MicWorld::shared(ENV, "gone").build().await?;
    let mic = w.start_mic("mic-gone", &[]).await?;
    let aai = w.bound_pod(APP_ID, "p", "gone-sel", &w.nodes[1]).await?;
    let binding = format!("{APP_ID}-gone-sel");
    w.wait_assigned(&aai).await?;
    let client = w.client().await?;
    let ns = w.ns.name().to_string();
    let policy = aadpodid_tests::unique_name("compat-refuse-aai-delete");
    refuse_aai_deletion(&client, &policy, &aai).await?;
    let result = async {
        // The policy is in force once it refuses a dry-run deletion.
        let aais =
            Api::<aadpodid_api::AzureAssignedIdentity>::namespaced(client.clone(), "default");
        wait_for_ok("the deletion policy in force", WAIT, || async {
            let dry = DeleteParams {
                dry_run: true,
                ..Default::default()
            };
            Ok(match aais.delete(&aai, &dry).await {
                Err(e) if e.to_string().contains("deletion refused by the test") => Some(()),
                Err(e) => anyhow::bail!("dry-run deletion: {e}"),
                Ok(_) => None,
            })
        })
        .await?;

        let node = w.nodes[1].clone();
        Api::<Node>::all(client.clone())
            .delete(&node, &DeleteParams::default())
            .await?;
        let events = Api::<Event>::namespaced(client.clone(), &ns);
        let errors = wait_for_ok("a 'binding remove error' Event", WAIT, || async {
            let e = binding_events(&events, &binding, "binding remove error").await?;
            Ok((!e.is_empty()).then_some(e))
        })
        .await;
        let errors = match errors {
            Ok(e) => e,
            Err(e) => {
                let all: Vec<_> = events
                    .list(&ListParams::default())
                    .await?
                    .items
                    .into_iter()
                    .map(|e| (e.reason, e.note, e.regarding.and_then(|r| r.name)))
                    .collect();
                anyhow::bail!("{e}: events {all:?}; AAI {:?}", w.aai(&aai).await?.map(|a| (a.status, a.metadata.deletion_timestamp)));
            }
        };
        let prefix = format!(
            "failed to remove AzureIdentityBinding {ns}/{binding} from node {node} for pod {ns}/p, error: "
        );
        for (type_, note) in &errors {
            assert_eq!(type_, "Warning");
            assert!(note.starts_with(&prefix), "{note}");
            assert!(note.contains("deletion refused by the test"), "{note}");
        }
        assert!(w.aai(&aai).await?.is_some(), "the apiserver kept it");
        assert!(
            binding_events(&events, &binding, "binding removed").await?.is_empty(),
            "nothing removed yet"
        );

        allow_aai_deletions(&client, &policy).await;
        w.wait_gone(&aai).await?;
        let removed = wait_for_ok("a 'binding removed' Event", WAIT, || async {
            let e = binding_events(&events, &binding, "binding removed").await?;
            Ok((!e.is_empty()).then_some(e))
        })
        .await?;
        assert_eq!(
            removed,
            vec![(
                "Normal".to_string(),
                format!("Binding {binding} removed from node {node} for pod p")
            )]
        );
        anyhow::Ok(())
    }
    .await;
    allow_aai_deletions(&client, &policy).await;
    w.close(mic).await?;
    result
}

/// The api-version of every Compute request the emulator answered after
/// request `since`.
fn compute_api_versions(w: &MicWorld, since: u64) -> std::collections::BTreeSet<String> {
    w.emu
        .requests(since)
        .iter()
        .filter(|r| {
            r.service == Service::Arm && r.uri.to_lowercase().contains("/microsoft.compute/")
        })
        .filter_map(|r| {
            r.uri
                .split(['?', '&'])
                .find_map(|p| p.strip_prefix("api-version="))
                .map(str::to_string)
        })
        .collect()
}

/// A new MIC `instance` with `flag`, and the emulator's last request
/// before it.
async fn restart(w: &MicWorld, instance: &str, flag: &str) -> anyhow::Result<(RunningMic, u64)> {
    let since = w.emu.requests(0).last().map_or(0, |r| r.seq);
    Ok((w.start_mic(instance, &[flag]).await?, since))
}

/// The tenant's azure.json names `AzureStackCloud` (it is how a custom
/// cloud's endpoints are given), and the emulator serves only what an Azure
/// Stack Hub with the 2020-09-01-hybrid profile serves (and upstream's
/// 2019-12-01): MIC sends the profile's Compute api-version by default and
/// `--compute-api-version`'s when set; the public cloud's 2024-11-01 is
/// refused there, as this project's fixed version was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by compat_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_compute_api_version_per_cloud_and_flag() -> anyhow::Result<()> {
    let w = MicWorld::shared(ENV, "apiver")
        .tenant(|cfg| {
            cfg.arm.compute_api_versions = Some(vec!["2019-12-01".into(), "2020-06-01".into()]);
        })
        .build()
        .await?;
    let mic = w.start_mic("mic-apiver", &[]).await?;
    let a = w.bound_pod(APP_ID, "a", "apiver-a", &w.nodes[0]).await?;
    w.wait_assigned(&a).await?;
    let first = compute_api_versions(&w, 0);
    assert_eq!(
        first,
        ["2020-06-01".to_string()].into(),
        "Azure Stack Hub's profile"
    );
    mic.stop().await?;

    let (mic, since) = restart(&w, "mic-apiver-2", "--compute-api-version=2019-12-01").await?;
    let b = w.bound_pod(APP2_ID, "b", "apiver-b", &w.nodes[1]).await?;
    w.wait_assigned(&b).await?;
    assert_eq!(
        compute_api_versions(&w, since),
        ["2019-12-01".to_string()].into(),
        "the flag's"
    );
    mic.stop().await?;

    // The public cloud's version: refused by this Azure Stack Hub, nothing assigned.
    let (mic, since) = restart(&w, "mic-apiver-3", "--compute-api-version=2024-11-01").await?;
    w.pod("c", "apiver-a", &w.vm_node).await?;
    let c = w.aai_name("c", APP_ID);
    wait_for("ARM refusing api-version 2024-11-01", WAIT, || async {
        w.emu
            .requests(since)
            .iter()
            .any(|r| r.status == 400 && r.uri.contains("api-version=2024-11-01"))
            .then_some(())
    })
    .await?;
    let state = w.aai(&c).await?.and_then(|x| x.status).map(|s| s.status);
    assert_ne!(state.as_deref(), Some("Assigned"));
    w.close(mic).await
}

/// `--clientQps=5` on a client of the real apiserver: 30 requests sent at
/// once complete no faster than the bucket pays for them (5 at once, then
/// 5 a second), and a watch started behind them is answered before the
/// last of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_qps_paces_requests_but_not_watches() -> anyhow::Result<()> {
    if aadpodid_tests::children::is_child(ENV) {
        return Ok(());
    }
    let cluster = Cluster::shared();
    let ns = cluster.temp_namespace("qps").await?;
    let limit = RateLimit::from_client_qps(5.0).context("a limit")?;
    let client =
        kube_client_with_limit(Some(cluster.kubeconfig()), "compat-test", Some(limit)).await?;
    let cms = Api::<ConfigMap>::namespaced(client.clone(), ns.name());
    // One object for the watch to report at once (with the admin client,
    // outside the bucket).
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "watched"}}))?;
    Api::<ConfigMap>::namespaced(cluster.admin_client().await?, ns.name())
        .create(&PostParams::default(), &cm)
        .await?;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let cms = cms.clone();
        tasks.push(tokio::spawn(async move {
            cms.list(&ListParams::default())
                .await
                .map(|_| start.elapsed())
        }));
    }
    // Behind the 30: a watch's first answer.
    let watch_at = {
        use futures::StreamExt as _;
        let stream = cms.watch(&WatchParams::default().timeout(5), "0").await?;
        let mut stream = std::pin::pin!(stream);
        match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
            Ok(Some(Ok(WatchEvent::Added(_) | WatchEvent::Bookmark(_)))) | Ok(None) => {}
            Ok(Some(other)) => anyhow::bail!("watch: {other:?}"),
            Err(_) => anyhow::bail!("the watch did not answer within 30 s"),
        }
        start.elapsed()
    };
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await??);
    }
    done.sort();
    // The i-th completion (from 1) needed i tokens: 5 at start, 5 a second.
    for (i, at) in done.iter().enumerate() {
        let paid = 5.0 + 5.0 * at.as_secs_f64();
        assert!(
            (i + 1) as f64 <= paid + 0.5,
            "request {} completed at {at:?}, before the bucket paid for it: {done:?}",
            i + 1
        );
    }
    let last = done.last().copied().unwrap_or_default();
    eprintln!(
        "--clientQps=5: 30 lists done at {:?} (first 5 by {:?}, last at {last:?}); watch answered at {watch_at:?}",
        done.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
        done.get(4).copied().unwrap_or_default(),
    );
    assert!(
        last >= Duration::from_millis(4_900),
        "30 requests take 5 s at least: {done:?}"
    );
    assert!(
        watch_at < last,
        "the watch ({watch_at:?}) answered before the last request ({last:?})"
    );
    Ok(())
}
