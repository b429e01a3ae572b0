//! `helm upgrade` from upstream's own chart 4.1.18 (taken from upstream's Go
//! module) to this chart, with the user's values, same release name and
//! namespace, then `helm rollback` to upstream, on a real apiserver of the
//! test's own. Object by object (uid and resourceVersion): every upstream
//! object is updated in place or removed, none is created twice (one nmi
//! DaemonSet, one mic Deployment at every step), a second upgrade or rollback
//! writes nothing, the values carry over. Helm leaves `crds/` alone on upgrade
//! and rollback: the CRDs stay upstream's until applied by hand, which the test
//! does as docs/migration.md says. No kubelet runs: objects, not pods.

use std::path::PathBuf;
use std::time::Duration;

use aadpodid_tests::helm::{self, CrdShape, Migration, Snapshot};
use aadpodid_tests::unique_name;
use anyhow::Context as _;
use serde_json::Value;

const RELEASE: &str = "aad-pod-identity";
const NS: &str = "kube-system";

/// `helm upgrade RELEASE <chart> -n NS <extra>` on the cluster, as it went.
fn try_upgrade(m: &Migration, chart: &str, extra: &[&str]) -> anyhow::Result<helm::HelmOutput> {
    m.try_helm(&[&["upgrade", RELEASE, chart, "-n", NS][..], extra].concat())
}

/// [`try_upgrade`], which must succeed.
fn upgrade(m: &Migration, chart: &str, extra: &[&str]) -> anyhow::Result<()> {
    let out = try_upgrade(m, chart, extra)?;
    anyhow::ensure!(
        out.success,
        "helm upgrade {extra:?}: {}{}",
        out.stdout,
        out.stderr
    );
    Ok(())
}

/// `helm rollback RELEASE 1`: back to upstream's first revision.
fn rollback(m: &Migration) -> anyhow::Result<()> {
    m.helm(&["rollback", RELEASE, "1", "-n", NS]).map(drop)
}

fn container_args(m: &Migration, kind: &str, name: &str) -> anyhow::Result<Vec<String>> {
    Ok(helm::container_args(&m.get_json(&["-n", NS, kind, name])?))
}

/// The user's values are what the live objects say.
fn values_in_effect(m: &Migration, step: &str) -> anyhow::Result<()> {
    let mic = m.get_json(&["-n", NS, "deployment", "aad-pod-identity-mic"])?;
    assert_eq!(mic["spec"]["replicas"], 3, "{step}");
    assert_eq!(
        mic["spec"]["template"]["metadata"]["labels"]["team"], "platform",
        "{step}"
    );
    let args = container_args(m, "deployment", "aad-pod-identity-mic")?;
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
    let env_list = env.as_array().context("mic's env")?;
    assert!(
        env_list
            .iter()
            .any(|e| e["name"] == "FORCENAMESPACED" && e["value"] == "true"),
        "{step}: {env}"
    );
    let nmi = container_args(m, "daemonset", "aad-pod-identity-nmi")?;
    for want in [
        "--allow-network-plugin-kubenet=true",
        "--MICNamespace=kube-system",
    ] {
        assert!(
            nmi.iter().any(|a| a == want),
            "{step}: {want} not in {nmi:?}"
        );
    }
    m.get_json(&["-n", "default", "azureidentity", "seed002-identity"])?;
    m.get_json(&["-n", "default", "azureidentitybinding", "seed002-binding"])?;
    m.get_json(&["clusterrole", "aad-pod-identity-view"])?;
    Ok(())
}

/// The same objects in `a` and `b`.
fn same_keys(a: &Snapshot, b: &Snapshot) -> bool {
    a.keys().eq(b.keys())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_upgrade_from_upstream_chart_and_rollback_replace_objects_in_place()
-> anyhow::Result<()> {
    // No CRDs yet: upstream's chart installs its own from crds/.
    let m = Migration::start(
        &[&format!("{NS}/aad-pod-identity-nmi")],
        &[&format!("{NS}/aad-pod-identity-mic")],
    )
    .await?;
    let work = std::env::temp_dir().join(unique_name("migration-helm"));
    std::fs::create_dir_all(&work)?;
    let _work = RemoveOnDrop(work.clone());
    let user_values = work.join("user-values.yaml");
    std::fs::write(&user_values, helm::USER_VALUES)?;
    let upstream_chart = helm::upstream_chart()?.display().to_string();
    let ours = helm::chart_dir().display().to_string();

    // 1. The user's upstream release.
    let user_values = user_values.display().to_string();
    m.helm(&[
        "install",
        RELEASE,
        &upstream_chart,
        "-n",
        NS,
        "-f",
        &user_values,
    ])?;
    m.cluster.wait_crds_established()?;
    let s1 = m.snapshot("upstream installed")?;
    assert!(s1.contains_key(&format!("AzurePodIdentityException/{NS}/mic")));
    assert_eq!(m.crd_shape()?, CrdShape::UPSTREAM, "upstream's CRDs");
    values_in_effect(&m, "upstream installed")?;
    println!("upstream release: {} objects", s1.len());

    // 2. --reuse-values takes the old chart's defaults with the old values:
    // this chart's new keys are missing, the render fails and nothing changes.
    m.step(&s1, "helm upgrade --reuse-values", || {
        let reuse = try_upgrade(&m, &ours, &["--reuse-values"])?;
        println!("helm says: {}", reuse.stderr.trim());
        assert!(!reuse.success, "--reuse-values: {}", reuse.stdout);
        Ok(())
    })?
    .wrote_nothing()?;

    // 3. The recommended upgrade: the release's values as a file, our CRDs
    // first (Helm never upgrades crds/).
    let old_values = work.join("old-values.yaml");
    let got = m.helm(&["get", "values", RELEASE, "-n", NS, "-o", "yaml"])?;
    std::fs::write(&old_values, &got)?;
    let old_values = old_values.display().to_string();
    let crd_file = helm::chart_dir()
        .join("crds/crd.yaml")
        .display()
        .to_string();
    let plain = m
        .cluster
        .kubectl_run(&["apply", "--server-side", "-f", &crd_file], None)?;
    println!(
        "CRDs, server-side apply without --force-conflicts: success={} {}",
        plain.success,
        plain.stderr.lines().next().unwrap_or_default()
    );
    let crds = m.step(&s1, "CRDs applied", || {
        let force = "--force-conflicts";
        m.kubectl(&["apply", "--server-side", force, "-f", &crd_file], None)?;
        m.cluster.wait_crds_established().map(drop)
    })?;
    let (s_crd, d_crd) = (crds.snap, crds.diff);
    assert_eq!(m.crd_shape()?, CrdShape::OURS, "our CRDs after the apply");
    assert!(d_crd.created.is_empty() && d_crd.deleted.is_empty());
    for crd in helm::CRD_NAMES {
        let key = format!("CustomResourceDefinition//{crd}");
        assert!(d_crd.replaced.contains(&key), "{key}: {d_crd:?}");
    }

    let with_old_values = ["-f", old_values.as_str()];
    let step = m.step(&s_crd, "helm upgrade upstream -> ours", || {
        upgrade(&m, &ours, &with_old_values)
    })?;
    let (s2, up, upgrade_took) = (step.snap, step.diff, step.took);
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
    let ds = m.get_json(&["-n", NS, "daemonset", "aad-pod-identity-nmi"])?;
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"],
        serde_json::json!({
            "app.kubernetes.io/name": "aad-pod-identity",
            "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": "nmi"
        })
    );
    let image = &ds["spec"]["template"]["spec"]["containers"][0]["image"];
    assert!(
        image.as_str().context("nmi's image")?.ends_with("-rs.0"),
        "{image}"
    );
    // MIC's Endpoints lock: get/update on that one object, in the lock's namespace.
    let role = m.get_json(&["-n", "kube-system", "role", "aad-pod-identity-mic"])?;
    assert!(
        role["rules"]
            .as_array()
            .context("the role's rules")?
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
    values_in_effect(&m, "after upgrade")?;
    assert_eq!(m.crd_shape()?, CrdShape::OURS, "CRDs after upgrade");

    // 4. The same upgrade again writes nothing.
    let s3 = m
        .step(&s2, "second helm upgrade", || {
            upgrade(&m, &ours, &with_old_values)
        })?
        .wrote_nothing()?;

    // 5. Rollback to upstream's revision 1.
    let back = m.step(&s3, "helm rollback to upstream", || rollback(&m))?;
    let s4 = back.snap;
    // Upstream's object set again, the same objects where they stayed.
    assert!(same_keys(&s4, &s1), "{:?}", back.diff);
    for key in [
        format!("DaemonSet/{NS}/aad-pod-identity-nmi"),
        format!("Deployment/{NS}/aad-pod-identity-mic"),
        "AzureIdentity/default/seed002-identity".to_string(),
    ] {
        helm::same_object(&s1, &s4, &key)?;
    }
    let nmi_args = container_args(&m, "daemonset", "aad-pod-identity-nmi")?;
    assert!(
        !nmi_args
            .iter()
            .any(|a| a.starts_with("--mic-service-accounts")),
        "upstream's nmi args again: {nmi_args:?}"
    );
    let ds = m.get_json(&["-n", NS, "daemonset", "aad-pod-identity-nmi"])?;
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1,
        "upstream's strategy again: {}",
        ds["spec"]["updateStrategy"]
    );
    values_in_effect(&m, "after rollback")?;
    // Helm leaves crds/ alone on rollback too: ours stay.
    assert_eq!(m.crd_shape()?, CrdShape::OURS, "CRDs after rollback");

    // 6. The same rollback again writes nothing.
    let s5 = m
        .step(&s4, "second helm rollback", || rollback(&m))?
        .wrote_nothing()?;

    // 7. Without any values flag Helm copies the last release's values (an
    // upgrade with one --set would not): the upgrade from upstream again.
    m.step(&s5, "bare helm upgrade after the rollback", || {
        upgrade(&m, &ours, &[])
    })?;
    values_in_effect(&m, "bare upgrade")?;
    // 8. --reset-then-reuse-values: this chart's defaults, the release's
    // values on top (Helm 3.14+): the same result from upstream's revision.
    rollback(&m)?;
    let s7 = m.snapshot("rolled back again")?;
    let reset = m.step(&s7, "helm upgrade --reset-then-reuse-values", || {
        upgrade(&m, &ours, &["--reset-then-reuse-values"])
    })?;
    values_in_effect(&m, "--reset-then-reuse-values")?;
    assert!(
        same_keys(&reset.snap, &s2),
        "the same objects as the upgrade with the values file"
    );
    // 9. An upstream release with fullnameOverride (which upstream's chart
    // used only for the -view/-edit roles): this chart would rename mic and
    // nmi, so the upgrade stops before writing anything.
    rollback(&m)?;
    let named = ["--reuse-values", "--set", "fullnameOverride=pid"];
    upgrade(&m, &upstream_chart, &named)?;
    let s9 = m.snapshot("upstream with fullnameOverride")?;
    m.step(&s9, "upgrade that would rename nmi", || {
        let renamed = try_upgrade(&m, &ours, &["--reset-then-reuse-values"])?;
        println!("helm says: {}", renamed.stderr.trim());
        assert!(!renamed.success, "{}", renamed.stdout);
        assert!(
            renamed.stderr.contains("both would run at once"),
            "{}",
            renamed.stderr
        );
        Ok(())
    })?
    .wrote_nothing()?;
    let unnamed = ["--reset-then-reuse-values", "--set", "fullnameOverride="];
    upgrade(&m, &ours, &unnamed)?;
    let s10 = m.snapshot("fullnameOverride removed")?;
    helm::same_object(&s1, &s10, &format!("DaemonSet/{NS}/aad-pod-identity-nmi"))?;

    let history = m.helm(&["history", RELEASE, "-n", NS, "-o", "json"])?;
    let history: Value = serde_json::from_str(&history)?;
    println!(
        "release history: {}",
        history
            .as_array()
            .context("helm history")?
            .iter()
            .map(|r| format!("{}:{}:{}", r["revision"], r["chart"], r["status"]))
            .collect::<Vec<_>>()
            .join(" ")
    );
    assert!(upgrade_took < Duration::from_secs(120), "{upgrade_took:?}");
    Ok(())
}

/// Removes a folder when dropped (also when the test fails).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
