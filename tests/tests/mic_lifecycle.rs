//! MIC against the real kube-apiserver and the Azure emulator over HTTPS.
//!
//! The Azure SDK trusts the emulator's test CA only through `SSL_CERT_FILE`,
//! which is process-wide and cannot be set from safe Rust once threads run.
//! So the one parent test writes a CA and a bundle, then re-runs this test
//! binary on the `child_` tests with the variable set; the children share one
//! cluster and run one at a time (each starts its own MIC, which watches the
//! whole cluster). The world they build is `aadpodid_tests::mic_world`.

use aadpodid_api::{AzureIdentity, AzureIdentitySpec};
use aadpodid_tests::mic_world::{MicWorld, RunningMic, WAIT, wait_for_ok};
use aadpodid_tests::tenant::{
    APP_CLIENT, APP_RG, APP2_CLIENT, KUBELET_CLIENT, NODE_RG, uai_id as uai,
};
use aadpodid_tests::{SUB, TENANT, unique_name};
use anyhow::Context as _;
use azure_emulator::Config;
use azure_emulator::faults::Fault;
use azure_emulator::observe::Service;
use kube::ResourceExt as _;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

const ENV: &str = "MICTEST";

aadpodid_tests::emulator_ca_parent_test!(mic_against_cluster_and_emulator, "MICTEST", 16, 900);

/// This test's world on the shared cluster; its MICs lead for 4 s.
async fn world(prefix: &str) -> anyhow::Result<MicWorld> {
    world_with(prefix, |_| {}).await
}

/// [`world`] with MIC `mic-<prefix>` started with `extra` arguments.
async fn world_and_mic(prefix: &str, extra: &[&str]) -> anyhow::Result<(MicWorld, RunningMic)> {
    let w = world(prefix).await?;
    let mic = w.start_mic(&format!("mic-{prefix}"), extra).await?;
    Ok((w, mic))
}

/// [`world_and_mic`] with pod `pod` on the first node, bound to `identity`
/// through `selector`; the name of the pod's AzureAssignedIdentity.
async fn world_mic_and_bound_pod(
    prefix: &str,
    extra: &[&str],
    (identity, pod, selector): (&str, &str, &str),
) -> anyhow::Result<(MicWorld, RunningMic, String)> {
    let (w, mic) = world_and_mic(prefix, extra).await?;
    let name = w.bound_pod(identity, pod, selector, &w.nodes[0]).await?;
    Ok((w, mic, name))
}

/// A world without the emulator's own throttling buckets, so that MIC's
/// write budget (`burst` writes at once, then `per_minute`) alone spaces its
/// writes, and MIC `mic-<prefix>` with that budget.
async fn world_and_budgeted_mic(
    prefix: &str,
    burst: &str,
    per_minute: &str,
) -> anyhow::Result<(MicWorld, RunningMic)> {
    let w = world_with(prefix, |cfg| cfg.throttle.enabled = false).await?;
    let budget = [
        format!("--arm-resource-write-burst={burst}"),
        format!("--arm-resource-writes-per-minute={per_minute}"),
    ];
    let args: Vec<&str> = budget.iter().map(String::as_str).collect();
    let mic = w.start_mic(&format!("mic-{prefix}"), &args).await?;
    Ok((w, mic))
}

/// AzureIdentity `ghost`: a well-formed ID of an identity the tenant does
/// not have (ARM refuses it with FailedIdentityOperation), with `client_id`.
async fn ghost_identity(w: &MicWorld, client_id: &str) -> anyhow::Result<()> {
    w.identity("ghost", &uai(APP_RG, "ghost"), client_id).await
}

/// AzureIdentity `id` of `resource` and `client_id`, bound through its own
/// binding `b-<id>` and selector `own-<pod>` to pod `pod` on `node`; why MIC
/// refused the pod's AzureAssignedIdentity.
async fn refused_identity(
    w: &MicWorld,
    (id, resource, client_id): (&str, &str, &str),
    pod: &str,
    node: &str,
) -> anyhow::Result<String> {
    w.identity(id, resource, client_id).await?;
    let selector = format!("own-{pod}");
    w.binding(&format!("b-{id}"), id, &selector).await?;
    w.pod(pod, &selector, node).await?;
    w.wait_refused(&w.aai_name(pod, id)).await
}

/// Like [`world`], with the emulator's config adjusted first.
async fn world_with(
    prefix: &str,
    tweak: impl FnOnce(&mut Config) + 'static,
) -> anyhow::Result<MicWorld> {
    MicWorld::shared(ENV, prefix)
        .mic_args(&["--leader-election-duration=4s"])
        .tenant(tweak)
        .build()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_pod_lifecycle_assigns_and_removes_the_identity() -> anyhow::Result<()> {
    let (w, mic, name) =
        world_mic_and_bound_pod("life", &[], ("app-id", "web", "life-sel")).await?;

    let aai = w.wait_assigned(&name).await?;
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
    assert!(mic.healthz().await? == "Active");
    let metrics = mic.metrics().await?;
    assert!(
        metrics.contains("aadpodidentity_assigned_identity_addition_count 1"),
        "{metrics}"
    );

    w.delete_pod("web").await?;
    w.wait_gone(&w.aai_name("web", "app-id")).await?;
    assert!(!w.on_vmss("app-id"), "identity removed before the AAI went");
    assert!(
        w.on_vmss("kubelet"),
        "the cluster identity is never touched"
    );

    w.close(mic).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_shared_identity_is_removed_after_the_last_pod() -> anyhow::Result<()> {
    let (w, mic, a) = world_mic_and_bound_pod("share", &[], ("app-id", "a", "share-sel")).await?;
    w.pod("b", "share-sel", &w.nodes[1]).await?;
    w.wait_assigned(&a).await?;
    w.wait_assigned(&w.aai_name("b", "app-id")).await?;

    w.delete_pod("a").await?;
    w.wait_gone(&w.aai_name("a", "app-id")).await?;
    assert!(
        w.on_vmss("app-id"),
        "pod b on the same scale set still uses it"
    );

    w.delete_pod("b").await?;
    w.wait_gone(&w.aai_name("b", "app-id")).await?;
    w.wait_on_vmss("app-id", false).await?;

    w.close(mic).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_malformed_identity_does_not_stop_the_controller() -> anyhow::Result<()> {
    let (w, mic) = world_and_mic("bad", &[]).await?;
    // Not a user-assigned identity ID: ignored, as upstream.
    w.identity("broken", "/subscriptions/nope", APP_CLIENT)
        .await?;
    w.binding("b-broken", "broken", "bad-sel").await?;
    // Does not parse as an AzureIdentity at all: replicas is not an int32.
    let raw = json!({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
        "metadata": {"name": "unparseable", "namespace": w.ns.name()},
        "spec": {"type": 0, "replicas": 99999999999i64, "clientID": "x"}
    });
    let out = w
        .cluster()
        .kubectl_run(&["apply", "-f", "-"], Some(&raw.to_string()))?;
    eprintln!(
        "unparseable identity accepted by the apiserver: {}",
        out.success
    );
    w.binding("b-unparseable", "unparseable", "bad-sel").await?;

    w.bound_pod("app-id", "web", "bad-sel", &w.nodes[0]).await?;
    w.wait_assigned(&w.aai_name("web", "app-id")).await?;
    assert!(w.aai(&w.aai_name("web", "broken")).await?.is_none());
    assert!(w.aai(&w.aai_name("web", "unparseable")).await?.is_none());
    assert!(w.on_vmss("app-id"));

    // Still watching: a later change is still acted on.
    w.delete_pod("web").await?;
    w.wait_gone(&w.aai_name("web", "app-id")).await?;

    w.close(mic).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_drift_is_repaired() -> anyhow::Result<()> {
    let (w, mic, name) =
        world_mic_and_bound_pod("drift", &[], ("app-id", "web", "drift-sel")).await?;
    w.wait_assigned(&name).await?;
    // Someone removes it behind MIC's back.
    assert_eq!(w.emu.strip_identities(&w.vmss, Some(&["app-id"][..])), 1);
    assert!(!w.on_vmss("app-id"));
    w.wait_on_vmss("app-id", true).await?;
    assert!(w.on_vmss("kubelet"));
    w.close(mic).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_leader_election_with_two_instances() -> anyhow::Result<()> {
    let w = world("lead").await?;
    let a = w.start_mic("mic-a", &[]).await?;
    a.wait_leading().await?;
    let b = w.start_mic("mic-b", &[]).await?;
    a.wait_healthz("Active").await?;
    assert_eq!(b.healthz().await?, "Not Active");
    assert!(!b.leading());

    w.bound_pod("app-id", "one", "lead-sel", &w.nodes[0])
        .await?;
    w.wait_assigned(&w.aai_name("one", "app-id")).await?;
    assert!(!b.leading(), "the standby never took over");

    // The leader goes; the standby takes over and carries on.
    a.stop().await?;
    b.wait_leading().await?;
    b.wait_healthz("Active").await?;
    w.bound_pod("app-2", "two", "lead-sel-2", &w.nodes[1])
        .await?;
    w.wait_assigned(&w.aai_name("two", "app-2")).await?;
    assert!(w.on_vmss("app-2"));

    w.close(b).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_service_principal_and_cluster_identity() -> anyhow::Result<()> {
    let (w, mic) = world_and_mic("sp", &[]).await?;
    let writes = |w: &MicWorld| w.emu.counters().arm_writes.values().sum::<u64>();

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
    Api::<AzureIdentity>::namespaced(w.client().await?, w.ns.name())
        .create(&PostParams::default(), &sp)
        .await?;
    w.binding("b-sp", "sp", "sp-sel").await?;
    w.pod("p1", "sp-sel", &w.nodes[0]).await?;
    w.wait_assigned(&w.aai_name("p1", "sp")).await?;
    assert_eq!(writes(&w), 0, "no ARM write for a service principal");

    // The cluster identity of azure.json, referenced by an AzureIdentity, is
    // never removed when its last pod goes (as upstream), and (unlike
    // upstream) never served: its AAI stays Created with the reason.
    w.bound_pod("kubelet", "p2", "kubelet-sel", &w.nodes[1])
        .await?;
    let refused = w.wait_refused(&w.aai_name("p2", "kubelet")).await?;
    assert!(refused.contains("--serve-cluster-identities"), "{refused}");
    w.delete_pod("p2").await?;
    w.wait_gone(&w.aai_name("p2", "kubelet")).await?;
    assert!(w.on_vmss("kubelet"));
    assert_eq!(
        writes(&w),
        0,
        "the kubelet identity was already there and stays"
    );

    w.close(mic).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_invalid_identity_does_not_hold_back_valid_ones() -> anyhow::Result<()> {
    let (w, mic) = world_and_mic("inv", &[]).await?;
    // The ghost is refused in the same batch as a valid one.
    ghost_identity(&w, "c0000000-0000-4000-8000-0000000000ff").await?;
    w.tenant_identity("app-id").await?;
    w.binding("b-ghost", "ghost", "inv-sel").await?;
    w.binding("b-app", "app-id", "inv-sel").await?;
    w.pod("web", "inv-sel", &w.nodes[0]).await?;
    w.wait_assigned(&w.aai_name("web", "app-id")).await?;
    assert!(w.on_vmss("app-id"));
    assert_created(&w, "web", "ghost").await?;

    w.close(mic).await
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
async fn child_invalid_identity_after_a_throttle_storm_does_not_hold_back_valid_ones()
-> anyhow::Result<()> {
    // The emulator's own buckets are off, so MIC's mirror alone spaces the
    // writes: 3 at once (2 throttled, 1 refused), then one per 15 s.
    let (w, mic) = world_and_budgeted_mic("qstorm", "3", "4").await?;
    w.emu.inject(throttle_storm(&w, "GET"));
    w.emu.inject(throttle_storm(&w, "PATCH"));
    ghost_identity(&w, "c0000000-0000-4000-8000-0000000000fe").await?;
    w.tenant_identity("app-id").await?;
    w.tenant_identity("app-2").await?;
    for (b, id) in [
        ("b-ghost", "ghost"),
        ("b-app", "app-id"),
        ("b-app2", "app-2"),
    ] {
        w.binding(b, id, "qstorm-sel").await?;
    }
    w.pod("web", "qstorm-sel", &w.nodes[0]).await?;
    w.wait_assigned(&w.aai_name("web", "app-id")).await?;
    w.wait_assigned(&w.aai_name("web", "app-2")).await?;
    assert!(w.on_vmss("app-id") && w.on_vmss("app-2"));
    assert!(!w.on_vmss("ghost"));

    // Answers to this scale set's PATCHes, in order: the storm's 429s, the
    // refusal (400), then the PATCH that landed the valid identities (200).
    let answers = w.vmss_patch_answers();
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
    assert_created(&w, "web", "ghost").await?;

    w.close(mic).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_standalone_vm_node_keeps_its_system_identity() -> anyhow::Result<()> {
    let (w, mic) = world_and_mic("vm", &[]).await?;
    w.bound_pod("app-id", "web", "vm-sel", &w.vm_node).await?;
    w.wait_assigned(&w.aai_name("web", "app-id")).await?;
    let on_vm = |w: &MicWorld| w.emu.assigned_identities(&w.vm_node).unwrap_or_default();
    assert_eq!(on_vm(&w), vec![uai(APP_RG, "app-id").to_lowercase()]);
    assert!(!w.on_vmss("app-id"), "the scale set is not touched");

    w.delete_pod("web").await?;
    w.wait_gone(&w.aai_name("web", "app-id")).await?;
    assert!(on_vm(&w).is_empty());
    assert_eq!(w.emu.has_system_identity(&w.vm_node), Some(true));

    w.close(mic).await
}

/// `pod`'s AzureAssignedIdentity of `identity` exists and is Created (not
/// Assigned).
async fn assert_created(w: &MicWorld, pod: &str, identity: &str) -> anyhow::Result<()> {
    let aai = w
        .aai(&w.aai_name(pod, identity))
        .await?
        .with_context(|| format!("{identity} AAI exists"))?;
    assert_eq!(aai.status.map(|s| s.status), Some("Created".into()));
    Ok(())
}

/// A 429 storm on the scale set's `method` requests: two answers of 429
/// with Retry-After: 1.
fn throttle_storm(w: &MicWorld, method: &str) -> Fault {
    Fault::status(Service::Arm, 429, Some(1))
        .method(method)
        .path_contains(&w.vmss)
        .times(2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_throttle_storm_backs_off_and_stays_within_budget() -> anyhow::Result<()> {
    // The emulator's own buckets are off (no remaining-resource headers), so
    // MIC's mirror is the only limiter: 3 writes, then one per 100 s.
    let w = world_with("storm", |cfg| cfg.throttle.enabled = false).await?;
    const BURST: u64 = 3;
    const PER_MINUTE: f64 = 0.6;
    let started = std::time::Instant::now();
    let mic = w
        .start_mic(
            "mic-storm",
            &[
                "--arm-resource-write-burst=3",
                "--arm-resource-writes-per-minute=0.6",
            ],
        )
        .await?;
    // A 429 storm on this scale set's PATCHes, each with Retry-After: 1.
    w.emu.inject(throttle_storm(&w, "PATCH"));
    w.tenant_identity("app-id").await?;
    w.tenant_identity("app-2").await?;
    w.binding("b1", "app-id", "storm-sel").await?;
    w.binding("b2", "app-2", "storm-sel").await?;
    w.pod("web", "storm-sel", &w.nodes[0]).await?;
    w.wait_assigned(&w.aai_name("web", "app-id")).await?;
    w.wait_assigned(&w.aai_name("web", "app-2")).await?;
    assert!(w.on_vmss("app-id") && w.on_vmss("app-2"));

    let c = w.emu.counters();
    let writes = w.vmss_patches();
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
    w.delete_pod("web").await?;
    wait_for_ok("a write deferred by the budget", WAIT, || async {
        let deferred = mic
            .metric("aadpodidentity_mic_arm_writes_deferred_count")
            .await?;
        Ok((deferred >= 1.0).then_some(()))
    })
    .await?;
    let allowed = BURST + (started.elapsed().as_secs_f64() * PER_MINUTE / 60.0).floor() as u64;
    assert!(w.vmss_patches() <= allowed);
    assert_eq!(
        w.emu.counters().arm_throttled,
        c.arm_throttled,
        "no new 429"
    );

    w.close(mic).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_failed_operation_keeps_created_then_converges() -> anyhow::Result<()> {
    // No emulator buckets; MIC's own budget spaces the retry (one per 10 s)
    // so the Created state after the failure is observable.
    let (w, mic) = world_and_budgeted_mic("lro", "1", "6").await?;
    // The next long-running operation ends Failed.
    w.emu.fail_next_operations(1);
    let name = w.bound_pod("app-id", "web", "lro-sel", &w.nodes[0]).await?;
    wait_for_ok("the failed update counted", WAIT, || async {
        Ok(mic
            .metrics()
            .await?
            .contains(
                "aadpodidentity_cloud_provider_operations_errors_count{operation_type=\"vmss_update\"} 1",
            )
            .then_some(()))
    })
    .await?;
    let aai = w.aai(&name).await?.context("AAI exists")?;
    assert_eq!(
        aai.status.map(|s| s.status),
        Some("Created".into()),
        "not Assigned after a failed operation"
    );
    // (The emulator, like ARM, keeps the requested identity in the model of
    // a scale set whose update failed; MIC does not take that as assigned.)

    // The fault is spent: the next PATCH lands.
    w.wait_assigned(&name).await?;
    assert!(w.on_vmss("app-id"));
    assert!(
        w.emu.counters().lro_started >= 2,
        "retried after the failure"
    );

    w.close(mic).await
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
            // Upstream's Endpoints leader lock, held with the Lease.
            {"apiGroups": [""], "resources": ["endpoints"],
             "verbs": ["get", "create", "update"]},
            {"apiGroups": ["", "events.k8s.io"], "resources": ["events"],
             "verbs": ["create", "patch"]},
        ],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_runs_with_the_chart_cluster_role_only() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    let w = world("rbac").await?;
    let role_name = unique_name("aad-pod-identity-mic");
    let role: ClusterRole = serde_json::from_value(mic_cluster_role(&role_name))?;
    let roles = Api::<ClusterRole>::all(w.client().await?);
    roles.create(&PostParams::default(), &role).await?;
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": role_name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
        "subjects": [{"kind": "ServiceAccount", "name": "mic", "namespace": w.ns.name()}],
    }))?;
    let bindings = Api::<ClusterRoleBinding>::all(w.client().await?);
    bindings.create(&PostParams::default(), &binding).await?;
    let kubeconfig = w
        .cluster()
        .service_account_kubeconfig(w.ns.name(), "mic")
        .await?;
    // The account really is limited: nothing beyond the role.
    let sa = w
        .cluster()
        .service_account_client(w.ns.name(), "mic")
        .await?;
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
    }))?;
    Api::<Role>::namespaced(w.client().await?, w.ns.name())
        .create(&PostParams::default(), &ledger_role)
        .await?;
    let ledger_binding: RoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "mic-ledger", "namespace": w.ns.name()},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "mic-ledger"},
        "subjects": [{"kind": "ServiceAccount", "name": "mic", "namespace": w.ns.name()}],
    }))?;
    Api::<RoleBinding>::namespaced(w.client().await?, w.ns.name())
        .create(&PostParams::default(), &ledger_binding)
        .await?;
    let mic = RunningMic::start(w.settings("mic-rbac", &[], Some(&kubeconfig))?).await?;
    w.bound_pod("app-id", "web", "rbac-sel", &w.nodes[0])
        .await?;
    w.wait_assigned(&w.aai_name("web", "app-id")).await?;
    assert!(w.on_vmss("app-id"));
    mic.wait_healthz("Active").await?;
    w.delete_pod("web").await?;
    w.wait_gone(&w.aai_name("web", "app-id")).await?;
    assert!(!w.on_vmss("app-id"));

    mic.stop().await?;
    let _ = bindings
        .delete(&role_name, &DeleteParams::default())
        .await?;
    let _ = roles.delete(&role_name, &DeleteParams::default()).await?;
    w.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_lazy_removal_lingers_and_a_returning_pod_costs_no_write() -> anyhow::Result<()> {
    let (w, mic) = world_and_mic("linger", &["--identity-removal-linger=5s"]).await?;
    w.bound_pod("app-id", "job-1", "cron-sel", &w.nodes[0])
        .await?;
    w.wait_assigned(&w.aai_name("job-1", "app-id")).await?;
    let writes = w.vmss_patches();

    // The CronJob's next run comes while the identity lingers: no ARM write.
    w.delete_pod("job-1").await?;
    w.pod("job-2", "cron-sel", &w.nodes[1]).await?;
    w.wait_assigned(&w.aai_name("job-2", "app-id")).await?;
    w.wait_gone(&w.aai_name("job-1", "app-id")).await?;
    assert!(w.on_vmss("app-id"));
    assert_eq!(
        w.vmss_patches(),
        writes,
        "the returning pod needed no PATCH"
    );

    // Nobody comes back: removed after the linger, with one PATCH.
    w.delete_pod("job-2").await?;
    w.wait_gone(&w.aai_name("job-2", "app-id")).await?;
    assert!(!w.on_vmss("app-id"), "removed before its AAI went");
    assert_eq!(w.vmss_patches(), writes + 1);

    w.close(mic).await
}

/// The entitlement attacks of a namespace user, against MIC alone: forged
/// client IDs, the kubelet identity's resource ID under another client ID,
/// and an identity that was on the scale set before MIC. Nothing of the
/// cluster's leaves the scale set, and every refusal is visible on the AAI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_entitlement_refusals_and_ownership() -> anyhow::Result<()> {
    // app-2 is on the scale set before MIC starts (an add-on's identity).
    let w = world_with("own", |cfg| {
        cfg.scale_sets[0].identity.user_assigned = vec!["kubelet".into(), "app-2".into()];
    })
    .await?;
    let mic = w.start_mic("mic-own", &[]).await?;
    let node = w.nodes[0].clone();

    // 1. Another identity's resource ID with the kubelet identity's client
    // ID: refused before anything is sent.
    let app_id = uai(APP_RG, "app-id");
    let forged = ("forged", app_id.as_str(), KUBELET_CLIENT);
    let why = refused_identity(&w, forged, "forged", &node).await?;
    assert!(why.contains("cluster's own identities"), "{why}");
    assert!(!w.on_vmss("app-id"), "the forged identity was never added");

    // 2. The kubelet identity's resource ID with another client ID.
    let kubelet = uai(NODE_RG, "kubelet");
    let why = refused_identity(&w, ("f6", &kubelet, APP_CLIENT), "f6", &node).await?;
    assert!(why.contains("cluster's own identities"), "{why}");

    // 3. A pre-existing identity with its true client ID: not served.
    w.bound_pod("app-2", "pre", "own-pre", &node).await?;
    let why = w.wait_refused(&w.aai_name("pre", "app-2")).await?;
    assert!(why.contains("before MIC added it"), "{why}");

    // 4. A client ID that is not the resource ID's: MIC adds the identity
    // (it cannot know before), then refuses the AAI on ARM's word.
    let mismatch = ("mismatch", app_id.as_str(), APP2_CLIENT);
    let why = refused_identity(&w, mismatch, "mm", &node).await?;
    assert!(
        why.contains(&format!("Azure reports {APP_CLIENT}")),
        "{why}"
    );
    assert!(w.on_vmss("app-id"));

    // The ledger lists app-id only (MIC's own add), in MIC's namespace.
    let cm =
        Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(w.client().await?, w.ns.name())
            .get("aad-pod-identity-mic-owned")
            .await?;
    let data = cm.data.unwrap_or_default();
    let entries = &data[&format!("vmss.{}", w.vmss.to_lowercase())];
    assert_eq!(
        entries.lines().count(),
        1,
        "one identity added by MIC: {data:?}"
    );
    let metrics = mic.metrics().await?;
    for (reason, n) in [
        ("ClusterIdentityRefused", 3),
        ("IdentityClientIDMismatch", 1),
    ] {
        let line = format!("aadpodidentity_mic_identity_refused_count{{reason=\"{reason}\"}} {n}");
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
    // The refusals are Events on the AzureIdentities.
    let events =
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(w.client().await?, w.ns.name());
    wait_for_ok("the refusal Events", WAIT, || async {
        let list = events.list(&Default::default()).await?.items;
        let reasons: std::collections::BTreeSet<String> = list
            .iter()
            .filter(|e| {
                e.regarding
                    .as_ref()
                    .is_some_and(|r| r.kind.as_deref() == Some("AzureIdentity"))
            })
            .filter_map(|e| e.reason.clone())
            .collect();
        Ok((reasons.contains("ClusterIdentityRefused")
            && reasons.contains("IdentityClientIDMismatch"))
        .then_some(()))
    })
    .await?;

    // Every pod goes: only MIC's own add leaves; the kubelet identity and
    // the pre-existing one stay.
    for pod in ["forged", "f6", "pre", "mm"] {
        w.delete_pod(pod).await?;
    }
    for (pod, id) in [
        ("forged", "forged"),
        ("f6", "f6"),
        ("pre", "app-2"),
        ("mm", "mismatch"),
    ] {
        w.wait_gone(&w.aai_name(pod, id)).await?;
    }
    w.wait_on_vmss("app-id", false).await?;
    assert!(w.on_vmss("kubelet"), "the kubelet identity stays");
    assert!(w.on_vmss("app-2"), "the pre-existing identity stays");
    // The removal landed: its entry left the ledger.
    wait_for_ok("the ledger emptied", WAIT, || async {
        let cm = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(
            w.client().await?,
            w.ns.name(),
        )
        .get("aad-pod-identity-mic-owned")
        .await?;
        Ok(cm.data.unwrap_or_default().is_empty().then_some(()))
    })
    .await?;

    w.close(mic).await
}

/// `--serve-cluster-identities` lets the kubelet identity be served (with
/// its true client ID); a MIC without it takes such an Assigned AAI back to
/// Created, as it does for one an earlier MIC (upstream's) marked Assigned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_serving_cluster_identities_is_opt_in_and_checked_again() -> anyhow::Result<()> {
    let flag = "--serve-cluster-identities";
    let (w, mic, name) =
        world_mic_and_bound_pod("serve", &[flag], ("kubelet", "p", "serve-sel")).await?;
    let aai = w.wait_assigned(&name).await?;
    assert!(
        !aai.annotations()
            .contains_key(aadpodid_api::ANNOTATION_ASSIGNMENT_ERROR)
    );
    mic.stop().await?;

    // Without the flag, the Assigned AAI is checked again and taken back.
    let mic = w.start_mic("mic-serve-2", &[]).await?;
    let why = w.wait_refused(&name).await?;
    assert!(why.contains(flag), "{why}");
    w.delete_pod("p").await?;
    w.wait_gone(&name).await?;
    assert!(w.on_vmss("kubelet"), "never removed");
    w.close(mic).await
}

/// The identity policy at run time: under `enforce` an identity not granted
/// to its namespace gets no AAI and an Event says why; granting it (the
/// Namespace annotation) assigns it; taking the grant away retires it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by mic_against_cluster_and_emulator in a child process that trusts the emulator CA"]
async fn child_identity_policy_enforce_and_warn() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Namespace;
    let (w, mic, name) = world_mic_and_bound_pod(
        "policy",
        &["--identity-policy=enforce"],
        ("app-id", "web", "policy-sel"),
    )
    .await?;
    let events =
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(w.client().await?, w.ns.name());
    let not_granted_events = || async {
        anyhow::Ok(
            events
                .list(&Default::default())
                .await?
                .items
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some("IdentityNotGranted"))
                .count(),
        )
    };
    wait_for_ok("the IdentityNotGranted Event", WAIT, || async {
        Ok((not_granted_events().await? >= 1).then_some(()))
    })
    .await?;
    assert!(w.aai(&name).await?.is_none(), "no AAI under enforce");
    assert!(!w.on_vmss("app-id"));

    // Granted by the cluster administrator: assigned.
    let namespaces = Api::<Namespace>::all(w.client().await?);
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
        ?;
    w.wait_assigned(&name).await?;
    assert!(w.on_vmss("app-id"));

    // The grant is taken away: retired, and removed (MIC added it).
    namespaces
        .patch(
            w.ns.name(),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(grant(serde_json::Value::Null)),
        )
        .await?;
    w.wait_gone(&name).await?;
    w.wait_on_vmss("app-id", false).await?;
    mic.stop().await?;

    // warn: assigned anyway, with the Event.
    let before = not_granted_events().await?;
    let mic = w
        .start_mic("mic-policy-warn", &["--identity-policy=warn"])
        .await?;
    w.wait_assigned(&name).await?;
    wait_for_ok("a new IdentityNotGranted Event", WAIT, || async {
        Ok((not_granted_events().await? > before).then_some(()))
    })
    .await?;
    w.delete_pod("web").await?;
    w.wait_gone(&name).await?;
    w.close(mic).await
}
