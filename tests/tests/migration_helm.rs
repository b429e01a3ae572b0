//! `helm upgrade` from upstream's own chart 4.1.18 (taken from upstream's Go
//! module) to this chart, with the user's values, same release name and
//! namespace, then `helm rollback` to upstream, on a real apiserver of the
//! test's own. Object by object (uid and resourceVersion): every upstream
//! object is updated in place or removed, none is created twice (one nmi
//! DaemonSet, one mic Deployment at every step), a second upgrade or rollback
//! writes nothing, the values carry over. Helm leaves `crds/` alone on upgrade
//! and rollback: the CRDs stay upstream's until applied by hand, which the test
//! does as docs/migration.md says. No kubelet runs: objects, not pods.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers outside #[test] functions fail the test by panicking"
)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use aadpodid_tests::helm::{self, CrdShape, Snapshot};
use aadpodid_tests::{PrivateCluster, unique_name};
use serde_json::Value;

const RELEASE: &str = "aad-pod-identity";
const NS: &str = "kube-system";

/// A user's values for upstream's chart 4.1.18: only keys upstream's
/// values.yaml has, a change from its default in most sections.
const USER_VALUES: &str = r#"forceNamespaced: "true"
mic:
  replicas: 3
  logVerbosity: 2
  leaderElection:
    namespace: kube-system
    duration: 30s
  syncRetryDuration: 1h30m
  clientQps: "10"
  immutableUserMSIs:
    - "00000000-0000-4000-8000-0000000000aa"
  podLabels:
    team: platform
nmi:
  allowNetworkPluginKubenet: true
  micNamespace: kube-system
  podLabels:
    team: platform
rbac:
  createUserFacingClusterRoles: true
azureIdentities:
  "seed002-identity":
    namespace: "default"
    type: 0
    resourceID: "/subscriptions/0b1f6471-1bf0-4dda-aec3-cb9272f09590/resourceGroups/app-rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/seed002"
    clientID: "c0000000-0000-4000-8000-000000000002"
    binding:
      name: "seed002-binding"
      selector: "seed002"
"#;

fn kubectl(c: &PrivateCluster, args: &[&str]) -> String {
    let out = c.kubectl_run(args, None).unwrap();
    assert!(out.success, "kubectl {args:?}: {}", out.stderr);
    out.stdout
}

fn get_json(c: &PrivateCluster, args: &[&str]) -> Value {
    helm::get_json(c, args).unwrap()
}

/// `helm <args>` on the cluster; panics with helm's words when it fails.
fn helm_ok(c: &PrivateCluster, args: &[&str]) -> String {
    let out = helm::run_on(c.kubeconfig(), args).unwrap();
    assert!(out.success, "helm {args:?}: {}{}", out.stdout, out.stderr);
    out.stdout
}

/// `helm upgrade RELEASE <chart> -n NS <extra>` on the cluster.
fn try_upgrade(c: &PrivateCluster, chart: &str, extra: &[&str]) -> helm::HelmOutput {
    let mut args = vec!["upgrade", RELEASE, chart, "-n", NS];
    args.extend_from_slice(extra);
    helm::run_on(c.kubeconfig(), &args).unwrap()
}

/// [`try_upgrade`], which must succeed.
fn upgrade(c: &PrivateCluster, chart: &str, extra: &[&str]) {
    let out = try_upgrade(c, chart, extra);
    assert!(
        out.success,
        "helm upgrade {extra:?}: {}{}",
        out.stdout, out.stderr
    );
}

fn snap(c: &PrivateCluster, baseline: &Snapshot) -> Snapshot {
    helm::snapshot(|| c.kubectl(), baseline).unwrap()
}

fn one_of_each(s: &Snapshot, step: &str) {
    // In the whole cluster, not only the release namespace.
    assert_eq!(
        helm::workloads(s),
        (
            vec![format!("DaemonSet/{NS}/aad-pod-identity-nmi")],
            vec![format!("Deployment/{NS}/aad-pod-identity-mic")]
        ),
        "{step}"
    );
}

fn container_args(c: &PrivateCluster, kind: &str, name: &str) -> Vec<String> {
    helm::container_args(&get_json(c, &["-n", NS, kind, name]))
}

/// The user's values are what the live objects say.
fn values_in_effect(c: &PrivateCluster, step: &str) {
    let mic = get_json(c, &["-n", NS, "deployment", "aad-pod-identity-mic"]);
    assert_eq!(mic["spec"]["replicas"], 3, "{step}");
    assert_eq!(
        mic["spec"]["template"]["metadata"]["labels"]["team"], "platform",
        "{step}"
    );
    let args = container_args(c, "deployment", "aad-pod-identity-mic");
    for want in [
        "--leader-election-namespace=kube-system",
        "--leader-election-duration=30s",
        "--syncRetryDuration=1h30m",
        "--clientQps=10",
        "--immutable-user-msis=00000000-0000-4000-8000-0000000000aa",
    ] {
        assert!(
            args.iter().any(|a| a == want),
            "{step}: {want} not in {args:?}"
        );
    }
    assert!(
        args.iter().any(|a| a == "-v=2" || a == "--v=2"),
        "{step}: {args:?}"
    );
    let env = &mic["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "FORCENAMESPACED" && e["value"] == "true"),
        "{step}: {env}"
    );
    let nmi = container_args(c, "daemonset", "aad-pod-identity-nmi");
    for want in [
        "--allow-network-plugin-kubenet=true",
        "--MICNamespace=kube-system",
    ] {
        assert!(
            nmi.iter().any(|a| a == want),
            "{step}: {want} not in {nmi:?}"
        );
    }
    kubectl(
        c,
        &["get", "-n", "default", "azureidentity", "seed002-identity"],
    );
    kubectl(
        c,
        &[
            "get",
            "-n",
            "default",
            "azureidentitybinding",
            "seed002-binding",
        ],
    );
    kubectl(c, &["get", "clusterrole", "aad-pod-identity-view"]);
}

fn uid(s: &Snapshot, key: &str) -> String {
    helm::uid(s, key)
        .unwrap_or_else(|| panic!("{key} missing"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_upgrade_from_upstream_chart_and_rollback_replace_objects_in_place() {
    // No CRDs yet: upstream's chart installs its own from crds/.
    let (c, baseline) = helm::bare_private_cluster().await.unwrap();
    let work = std::env::temp_dir().join(unique_name("migration-helm"));
    std::fs::create_dir_all(&work).unwrap();
    let _work = RemoveOnDrop(work.clone());
    let user_values = work.join("user-values.yaml");
    std::fs::write(&user_values, USER_VALUES).unwrap();
    let upstream_chart = helm::upstream_chart().unwrap();
    let ours = helm::chart_dir();
    let (upstream_chart, ours) = (
        upstream_chart.display().to_string(),
        ours.display().to_string(),
    );

    // 1. The user's upstream release.
    helm_ok(
        &c,
        &[
            "install",
            RELEASE,
            &upstream_chart,
            "-n",
            NS,
            "-f",
            &user_values.display().to_string(),
        ],
    );
    c.wait_crds_established().unwrap();
    let s1 = snap(&c, &baseline);
    one_of_each(&s1, "upstream installed");
    assert!(s1.contains_key(&format!("AzurePodIdentityException/{NS}/mic")));
    assert_eq!(
        helm::crd_shape(&c).unwrap(),
        CrdShape::UPSTREAM,
        "upstream's CRDs"
    );
    values_in_effect(&c, "upstream installed");
    println!("upstream release: {} objects", s1.len());

    // 2. --reuse-values takes the old chart's defaults with the old values:
    // this chart's new keys are missing, the render fails and nothing changes.
    let reuse = try_upgrade(&c, &ours, &["--reuse-values"]);
    println!(
        "helm upgrade --reuse-values: success={} {}",
        reuse.success,
        reuse.stderr.trim()
    );
    assert!(!reuse.success, "--reuse-values: {}", reuse.stdout);
    let after_reuse = snap(&c, &baseline);
    let d = helm::diff(&s1, &after_reuse);
    assert!(
        d.replaced.is_empty() && d.created.is_empty() && d.deleted.is_empty(),
        "{d:?}"
    );

    // 3. The recommended upgrade: the release's values as a file, our CRDs
    // first (Helm never upgrades crds/).
    let old_values = work.join("old-values.yaml");
    let got = helm_ok(&c, &["get", "values", RELEASE, "-n", NS, "-o", "yaml"]);
    std::fs::write(&old_values, &got).unwrap();
    let crd_file = helm::chart_dir().join("crds/crd.yaml");
    let plain = c
        .kubectl_run(
            &[
                "apply",
                "--server-side",
                "-f",
                &crd_file.display().to_string(),
            ],
            None,
        )
        .unwrap();
    println!(
        "CRDs, server-side apply without --force-conflicts: success={} {}",
        plain.success,
        plain.stderr.lines().next().unwrap_or_default()
    );
    let crd_apply = Instant::now();
    kubectl(
        &c,
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            &crd_file.display().to_string(),
        ],
    );
    c.wait_crds_established().unwrap();
    let crd_took = crd_apply.elapsed();
    let s_crd = snap(&c, &baseline);
    let d_crd = helm::diff(&s1, &s_crd);
    println!("CRDs applied ({crd_took:.2?}): {}", d_crd.figures());
    assert_eq!(
        helm::crd_shape(&c).unwrap(),
        CrdShape::OURS,
        "our CRDs after the apply"
    );
    assert!(d_crd.recreated.is_empty() && d_crd.created.is_empty() && d_crd.deleted.is_empty());
    for crd in helm::CRD_NAMES {
        let key = format!("CustomResourceDefinition//{crd}");
        assert!(d_crd.replaced.contains(&key), "{key}: {d_crd:?}");
    }

    let t = Instant::now();
    upgrade(&c, &ours, &["-f", &old_values.display().to_string()]);
    let upgrade_took = t.elapsed();
    let s2 = snap(&c, &baseline);
    let up = helm::diff(&s_crd, &s2);
    println!(
        "helm upgrade upstream -> ours ({upgrade_took:.2?}): {}",
        up.figures()
    );
    println!("  replaced: {:?}", up.replaced);
    println!("  created: {:?}", up.created);
    println!("  deleted: {:?}", up.deleted);
    one_of_each(&s2, "after upgrade");
    assert!(up.recreated.is_empty(), "recreated: {:?}", up.recreated);
    for key in [
        format!("DaemonSet/{NS}/aad-pod-identity-nmi"),
        format!("Deployment/{NS}/aad-pod-identity-mic"),
        format!("ServiceAccount/{NS}/aad-pod-identity-mic"),
        format!("ServiceAccount/{NS}/aad-pod-identity-nmi"),
        "ClusterRole//aad-pod-identity-mic".to_string(),
        "ClusterRoleBinding//aad-pod-identity-nmi".to_string(),
    ] {
        assert!(
            up.replaced.contains(&key),
            "{key} not replaced in place: {up:?}"
        );
    }
    // Upstream's label-based MIC exception goes; nothing else of upstream's.
    assert_eq!(
        up.deleted,
        vec![format!("AzurePodIdentityException/{NS}/mic")],
        "{up:?}"
    );
    for k in &up.created {
        assert!(!s1.contains_key(k), "{k}");
    }
    // The selectors are upstream's, unchanged (they are immutable).
    let ds = get_json(&c, &["-n", NS, "daemonset", "aad-pod-identity-nmi"]);
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"],
        serde_json::json!({
            "app.kubernetes.io/name": "aad-pod-identity",
            "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": "nmi"
        })
    );
    assert!(
        ds["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap()
            .ends_with("-rs.0"),
        "{}",
        ds["spec"]["template"]["spec"]["containers"][0]["image"]
    );
    // MIC's Endpoints lock: get/update on that one object, in the lock's namespace.
    let role = get_json(&c, &["-n", "kube-system", "role", "aad-pod-identity-mic"]);
    assert!(
        role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resources"][0] == "endpoints"
                && r["resourceNames"][0] == "aad-pod-identity-mic"),
        "{role}"
    );
    // NMI rolls surge-first (the new pod ready before the old one stops).
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"],
        serde_json::json!({"maxSurge": 1, "maxUnavailable": 0}),
        "{}",
        ds["spec"]["updateStrategy"]
    );
    values_in_effect(&c, "after upgrade");
    assert_eq!(
        helm::crd_shape(&c).unwrap(),
        CrdShape::OURS,
        "CRDs after upgrade"
    );

    // 4. The same upgrade again writes nothing.
    upgrade(&c, &ours, &["-f", &old_values.display().to_string()]);
    let s3 = snap(&c, &baseline);
    let again = helm::diff(&s2, &s3);
    println!("second helm upgrade: {}", again.figures());
    assert_eq!(again.unchanged.len(), s2.len(), "{again:?}");

    // 5. Rollback to upstream's revision 1.
    let t = Instant::now();
    helm_ok(&c, &["rollback", RELEASE, "1", "-n", NS]);
    let rollback_took = t.elapsed();
    let s4 = snap(&c, &baseline);
    let back = helm::diff(&s3, &s4);
    println!(
        "helm rollback to upstream ({rollback_took:.2?}): {}",
        back.figures()
    );
    println!("  deleted: {:?}", back.deleted);
    println!("  created: {:?}", back.created);
    one_of_each(&s4, "after rollback");
    assert!(back.recreated.is_empty(), "{back:?}");
    // Upstream's object set again, the same objects where they stayed.
    let s1_keys: Vec<&String> = s1.keys().collect();
    let s4_keys: Vec<&String> = s4.keys().collect();
    assert_eq!(s4_keys, s1_keys);
    for key in [
        format!("DaemonSet/{NS}/aad-pod-identity-nmi"),
        format!("Deployment/{NS}/aad-pod-identity-mic"),
        "AzureIdentity/default/seed002-identity".to_string(),
    ] {
        assert_eq!(uid(&s4, &key), uid(&s1, &key), "{key}");
    }
    let nmi_args = container_args(&c, "daemonset", "aad-pod-identity-nmi");
    assert!(
        !nmi_args
            .iter()
            .any(|a| a.starts_with("--mic-service-accounts")),
        "upstream's nmi args again: {nmi_args:?}"
    );
    let ds = get_json(&c, &["-n", NS, "daemonset", "aad-pod-identity-nmi"]);
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1,
        "upstream's strategy again: {}",
        ds["spec"]["updateStrategy"]
    );
    values_in_effect(&c, "after rollback");
    // Helm leaves crds/ alone on rollback too: ours stay.
    assert_eq!(
        helm::crd_shape(&c).unwrap(),
        CrdShape::OURS,
        "CRDs after rollback"
    );

    // 6. The same rollback again writes nothing.
    helm_ok(&c, &["rollback", RELEASE, "1", "-n", NS]);
    let s5 = snap(&c, &baseline);
    let again = helm::diff(&s4, &s5);
    println!("second helm rollback: {}", again.figures());
    assert_eq!(again.unchanged.len(), s4.len(), "{again:?}");

    // 7. Without any values flag Helm copies the last release's values (an
    // upgrade with one --set would not): the upgrade from upstream again.
    upgrade(&c, &ours, &[]);
    let s6 = snap(&c, &baseline);
    one_of_each(&s6, "bare upgrade");
    values_in_effect(&c, "bare upgrade");
    let bare = helm::diff(&s5, &s6);
    println!("bare helm upgrade after the rollback: {}", bare.figures());
    assert!(bare.recreated.is_empty(), "{bare:?}");
    // 8. --reset-then-reuse-values: this chart's defaults, the release's
    // values on top (Helm 3.14+): the same result from upstream's revision.
    helm_ok(&c, &["rollback", RELEASE, "1", "-n", NS]);
    let s7 = snap(&c, &baseline);
    upgrade(&c, &ours, &["--reset-then-reuse-values"]);
    let s8 = snap(&c, &baseline);
    one_of_each(&s8, "--reset-then-reuse-values");
    values_in_effect(&c, "--reset-then-reuse-values");
    let reset = helm::diff(&s7, &s8);
    println!(
        "helm upgrade --reset-then-reuse-values: {}",
        reset.figures()
    );
    assert!(reset.recreated.is_empty(), "{reset:?}");
    assert_eq!(
        s8.keys().collect::<Vec<_>>(),
        s2.keys().collect::<Vec<_>>(),
        "the same objects as the upgrade with the values file"
    );
    // 9. An upstream release with fullnameOverride (which upstream's chart
    // used only for the -view/-edit roles): this chart would rename mic and
    // nmi, so the upgrade stops before writing anything.
    helm_ok(&c, &["rollback", RELEASE, "1", "-n", NS]);
    upgrade(
        &c,
        &upstream_chart,
        &["--reuse-values", "--set", "fullnameOverride=pid"],
    );
    let s9 = snap(&c, &baseline);
    one_of_each(&s9, "upstream with fullnameOverride");
    let renamed = try_upgrade(&c, &ours, &["--reset-then-reuse-values"]);
    println!(
        "upgrade that would rename nmi: success={} {}",
        renamed.success,
        renamed.stderr.trim()
    );
    assert!(!renamed.success, "{}", renamed.stdout);
    assert!(
        renamed.stderr.contains("both would run at once"),
        "{}",
        renamed.stderr
    );
    let d = helm::diff(&s9, &snap(&c, &baseline));
    assert_eq!(d.unchanged.len(), s9.len(), "nothing written: {d:?}");
    upgrade(
        &c,
        &ours,
        &["--reset-then-reuse-values", "--set", "fullnameOverride="],
    );
    let s10 = snap(&c, &baseline);
    one_of_each(&s10, "fullnameOverride removed");
    assert_eq!(
        uid(&s10, &format!("DaemonSet/{NS}/aad-pod-identity-nmi")),
        uid(&s1, &format!("DaemonSet/{NS}/aad-pod-identity-nmi"))
    );

    let history = helm_ok(&c, &["history", RELEASE, "-n", NS, "-o", "json"]);
    let history: Value = serde_json::from_str(&history).unwrap();
    println!(
        "release history: {}",
        history
            .as_array()
            .unwrap()
            .iter()
            .map(|r| format!("{}:{}:{}", r["revision"], r["chart"], r["status"]))
            .collect::<Vec<_>>()
            .join(" ")
    );
    assert!(upgrade_took < Duration::from_secs(120), "{upgrade_took:?}");
}

/// Removes a folder when dropped (also when the test fails).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
