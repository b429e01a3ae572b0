//! `kubectl apply` of this project's flat manifests (`deploy/infra`) over
//! upstream v1.8.17's own (`deploy/infra/deployment-rbac.yaml` and
//! `mic-exception.yaml` from upstream's Go module, with seed 002's edit), on a
//! real apiserver of the test's own, and the way back. Object by object (uid
//! and resourceVersion): each upstream object is updated in place, never
//! created a second time (one nmi DaemonSet and one mic Deployment at every
//! step), a second apply writes nothing, and the rollback commands of
//! docs/migration.md give back upstream's object set with the same objects.
//! No kubelet runs: objects, not pods.

use aadpodid_tests::helm::{self, CrdShape, Migration, Render};
use aadpodid_tests::repo_root;
use anyhow::Context as _;

const NS: &str = "default";

/// A user's identity and binding, stored under upstream's CRDs.
const USER_OBJECTS: &str = r#"apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata:
  name: seed002-identity
  namespace: default
spec:
  type: 0
  resourceID: /subscriptions/0b1f6471-1bf0-4dda-aec3-cb9272f09590/resourceGroups/app-rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/seed002
  clientID: c0000000-0000-4000-8000-000000000002
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata:
  name: seed002-binding
  namespace: default
spec:
  azureIdentity: seed002-identity
  selector: seed002
"#;

/// A bare cluster of the test's own on which every step must leave one
/// DaemonSet `nmi` and one Deployment `mic`, both in [`NS`].
async fn one_of_each() -> anyhow::Result<Migration> {
    Migration::start(&[&format!("{NS}/nmi")], &[&format!("{NS}/mic")]).await
}

fn nmi_args(m: &Migration) -> anyhow::Result<Vec<String>> {
    Ok(helm::container_args(&m.get_json(&[
        "-n",
        NS,
        "daemonset",
        "nmi",
    ])?))
}

/// kubectl apply's lines that say an object was written.
fn written_lines(out: &str) -> Vec<&str> {
    out.lines().filter(|l| !l.ends_with(" unchanged")).collect()
}

/// `Kind/namespace/name` of an object.
fn key_of(obj: &serde_json::Value) -> anyhow::Result<String> {
    let field = |v: &serde_json::Value| v.as_str().map(str::to_string);
    Ok(format!(
        "{}/{}/{}",
        field(&obj["kind"]).context("kind")?,
        field(&obj["metadata"]["namespace"]).unwrap_or_default(),
        field(&obj["metadata"]["name"]).context("name")?
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_over_upstream_manifests_replaces_objects_in_place_and_back()
-> anyhow::Result<()> {
    let m = one_of_each().await?;

    // 1. Upstream as seed 002 installed it: upstream's deployment-rbac.yaml
    // with --allow-network-plugin-kubenet=true added to nmi, then
    // mic-exception.yaml, with client-side kubectl apply.
    let upstream_text = std::fs::read_to_string(helm::upstream_manifest("deployment-rbac.yaml")?)?;
    let edited = upstream_text.replacen(
        "          - \"--metadata-header-required=true\"\n",
        "          - \"--metadata-header-required=true\"\n          - \"--allow-network-plugin-kubenet=true\"\n",
        1,
    );
    assert_ne!(edited, upstream_text, "seed 002's edit applies");
    let exceptions = std::fs::read_to_string(helm::upstream_manifest("mic-exception.yaml")?)?;
    let apply_upstream = || -> anyhow::Result<()> {
        m.apply(&edited)?;
        m.apply(&exceptions)?;
        Ok(())
    };
    m.apply(&edited)?;
    m.cluster.wait_crds_established()?;
    m.apply(&exceptions)?;
    m.apply(USER_OBJECTS)?;
    let s1 = m.snapshot("upstream applied")?;
    assert_eq!(m.crd_shape()?, CrdShape::UPSTREAM, "upstream's CRDs");
    println!("upstream's manifests: {} objects", s1.len());

    // 2. Ours, as shipped. A server-side dry run first (docs/migration.md).
    let ours = std::fs::read_to_string(repo_root().join("deploy/infra/deployment-rbac.yaml"))?;
    let dry = m.kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&ours))?;
    for line in [
        "daemonset.apps/nmi configured (server dry run)",
        "deployment.apps/mic configured (server dry run)",
    ] {
        assert!(dry.lines().any(|l| l == line), "{line} not in {dry}");
    }
    let mut out = String::new();
    let step = m.step(&s1, "kubectl apply of ours over upstream's", || {
        out = m.apply(&ours)?;
        Ok(())
    })?;
    let (s2, up) = (step.snap, step.diff);
    println!("  unchanged: {:?}", up.unchanged);
    assert!(up.deleted.is_empty(), "{up:?}");
    // Every object of upstream's deployment-rbac.yaml is written in place.
    for obj in helm::objects(&helm::parse_documents(&upstream_text)?) {
        let key = key_of(&obj)?;
        assert!(
            up.replaced.contains(&key),
            "{key} not replaced in place: {up:?}"
        );
    }
    // The only upstream object left as it was: the label-based MIC exception,
    // which ours does not have (deleted in step 4).
    let untouched: Vec<&String> = up
        .unchanged
        .iter()
        .filter(|k| !k.starts_with("AzureIdentity"))
        .collect();
    assert_eq!(
        untouched,
        vec![&format!("AzurePodIdentityException/{NS}/mic-exception")],
        "{up:?}"
    );
    assert_eq!(m.crd_shape()?, CrdShape::OURS, "our CRDs");
    let ds = m.get_json(&["-n", NS, "daemonset", "nmi"])?;
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"],
        serde_json::json!({"component": "nmi", "tier": "node"})
    );
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"],
        serde_json::json!({"maxSurge": 1, "maxUnavailable": 0}),
        "surge-first: {}",
        ds["spec"]["updateStrategy"]
    );
    let args = nmi_args(&m)?;
    assert!(
        args.iter()
            .any(|a| a == "--mic-service-accounts=aad-pod-id-mic-service-account"),
        "{args:?}"
    );
    assert!(!written_lines(&out).is_empty());

    // 3. The same apply again writes nothing.
    let s3 = m
        .step(&s2, "second kubectl apply", || {
            out = m.apply(&ours)?;
            Ok(())
        })?
        .wrote_nothing()?;
    // kubectl may still say "configured" where its patch normalises to
    // nothing on the server (no resourceVersion moved, as checked above).
    println!(
        "  kubectl's words for the second apply: {:?}",
        written_lines(&out)
    );

    // 4. The user's own edit carried over by rendering the chart with the
    // same names and their value; upstream's label-based MIC exception deleted.
    // As deploy/infra/generate.sh renders: Helm's own labels left out.
    let mut custom = helm::objects(&helm::template(
        &Render::new("aad-pod-identity", NS)
            .with_crds()
            .set("upstreamManifestNames", "true")
            .set("nmi.allowNetworkPluginKubenet", "true"),
    )?);
    custom.iter_mut().for_each(helm::strip_helm_labels);
    let custom = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": custom});
    let edit = m.step(&s3, "user's edit re-applied, mic-exception deleted", || {
        m.apply(&custom.to_string())?;
        let exception = "azurepodidentityexception";
        m.kubectl(&["delete", "-n", NS, exception, "mic-exception"], None)
            .map(drop)
    })?;
    let (s4, edit) = (edit.snap, edit.diff);
    assert!(edit.created.is_empty(), "{edit:?}");
    assert_eq!(
        edit.replaced,
        vec![format!("DaemonSet/{NS}/nmi")],
        "only nmi's args differ"
    );
    assert!(
        nmi_args(&m)?
            .iter()
            .any(|a| a == "--allow-network-plugin-kubenet=true")
    );

    // 5. Back to upstream: its files again, then the objects it does not have.
    let back = m.step(&s4, "back to upstream's manifests", || {
        apply_upstream()?;
        for args in helm::MANIFESTS_ROLLBACK_DELETES {
            m.kubectl(args, None)?;
        }
        Ok(())
    })?;
    let s5 = back.snap;
    assert_eq!(
        s5.keys().collect::<Vec<_>>(),
        s1.keys().collect::<Vec<_>>(),
        "upstream's object set again"
    );
    for key in [
        format!("DaemonSet/{NS}/nmi"),
        format!("Deployment/{NS}/mic"),
        format!("ServiceAccount/{NS}/aad-pod-id-mic-service-account"),
        "CustomResourceDefinition//azureidentities.aadpodidentity.k8s.io".to_string(),
        "AzureIdentity/default/seed002-identity".to_string(),
        "AzureIdentityBinding/default/seed002-binding".to_string(),
    ] {
        helm::same_object(&s1, &s5, &key)?;
    }
    assert!(
        !nmi_args(&m)?
            .iter()
            .any(|a| a.starts_with("--mic-service-accounts")),
        "upstream's nmi args again"
    );
    let ds = m.get_json(&["-n", NS, "daemonset", "nmi"])?;
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"],
        serde_json::json!({"maxSurge": 0, "maxUnavailable": 1}),
        "upstream's (the server's defaults) again: {}",
        ds["spec"]["updateStrategy"]
    );
    // Client-side apply removes what the last applied file had and this one
    // lacks: upstream's CRDs again.
    assert_eq!(m.crd_shape()?, CrdShape::UPSTREAM, "upstream's CRDs again");

    // 6. The rollback again writes nothing.
    m.step(&s5, "second rollback apply", apply_upstream)?
        .wrote_nothing()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_mode_manifest_replaces_upstreams_in_place() -> anyhow::Result<()> {
    // Only nmi, in kube-system.
    let m = Migration::start(&["kube-system/nmi"], &[]).await?;
    let upstream_text =
        std::fs::read_to_string(helm::upstream_manifest("managed-mode-deployment.yaml")?)?;
    m.apply(&upstream_text)?;
    m.cluster.wait_crds_established()?;
    let s1 = m.snapshot("upstream's managed mode")?;

    let ours =
        std::fs::read_to_string(repo_root().join("deploy/infra/managed-mode-deployment.yaml"))?;
    let apply_ours = || m.apply(&ours).map(drop);
    let step = m.step(
        &s1,
        "managed mode: kubectl apply of ours over upstream's",
        apply_ours,
    )?;
    let up = &step.diff;
    assert!(up.deleted.is_empty(), "{up:?}");
    assert_eq!(
        up.replaced.len(),
        s1.len(),
        "every upstream object in place: {up:?}"
    );

    m.step(&step.snap, "managed mode, second apply", apply_ours)?
        .wrote_nothing()?;
    Ok(())
}
