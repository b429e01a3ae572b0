//! `kubectl apply` of this project's flat manifests (`deploy/infra`) over
//! upstream v1.8.17's own (`deploy/infra/deployment-rbac.yaml` and
//! `mic-exception.yaml` from upstream's Go module, with seed 002's edit), on a
//! real apiserver of the test's own, and the way back. Object by object (uid
//! and resourceVersion): each upstream object is updated in place, never
//! created a second time (one nmi DaemonSet and one mic Deployment at every
//! step), a second apply writes nothing, and the rollback commands of
//! docs/migration.md give back upstream's object set with the same objects.
//! No kubelet runs: objects, not pods.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers outside #[test] functions fail the test by panicking"
)]

use std::time::Instant;

use aadpodid_tests::helm::{self, CrdShape, Render, Snapshot};
use aadpodid_tests::{PrivateCluster, repo_root};
use serde_json::Value;

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

/// What docs/migration.md says to run to go back to upstream's manifests
/// after re-applying them: the objects upstream's files do not have.
const ROLLBACK_DELETES: [&[&str]; 2] = [
    &[
        "delete",
        "-n",
        "default",
        "role,rolebinding",
        "aad-pod-id-mic",
        "aad-pod-id-mic-owned-identities",
        "aad-pod-id-nmi",
        "--ignore-not-found",
    ],
    &[
        "delete",
        "validatingadmissionpolicybinding,validatingadmissionpolicy",
        "aad-pod-identity-identity-grants",
        "aad-pod-identity-assigned-identity-writers",
        "aad-pod-identity-exception-writers",
        "--ignore-not-found",
    ],
];

fn kubectl(c: &PrivateCluster, args: &[&str], stdin: Option<&str>) -> String {
    let out = c.kubectl_run(args, stdin).unwrap();
    assert!(out.success, "kubectl {args:?}: {}", out.stderr);
    out.stdout
}

fn get_json(c: &PrivateCluster, args: &[&str]) -> Value {
    helm::get_json(c, args).unwrap()
}

fn snap(c: &PrivateCluster, baseline: &Snapshot) -> Snapshot {
    helm::snapshot(|| c.kubectl(), baseline).unwrap()
}

fn one_of_each(s: &Snapshot, step: &str) {
    // In the whole cluster, not only the release namespace.
    assert_eq!(
        helm::workloads(s),
        (
            vec![format!("DaemonSet/{NS}/nmi")],
            vec![format!("Deployment/{NS}/mic")]
        ),
        "{step}"
    );
}

fn uid(s: &Snapshot, key: &str) -> String {
    helm::uid(s, key)
        .unwrap_or_else(|| panic!("{key} missing"))
        .to_string()
}

fn nmi_args(c: &PrivateCluster) -> Vec<String> {
    helm::container_args(&get_json(c, &["-n", NS, "daemonset", "nmi"]))
}

/// kubectl apply's lines that say an object was written.
fn written_lines(out: &str) -> Vec<&str> {
    out.lines().filter(|l| !l.ends_with(" unchanged")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_over_upstream_manifests_replaces_objects_in_place_and_back() {
    let (c, baseline) = helm::bare_private_cluster().await.unwrap();

    // 1. Upstream as seed 002 installed it: upstream's deployment-rbac.yaml
    // with --allow-network-plugin-kubenet=true added to nmi, then
    // mic-exception.yaml, with client-side kubectl apply.
    let upstream_text =
        std::fs::read_to_string(helm::upstream_manifest("deployment-rbac.yaml").unwrap()).unwrap();
    let edited = upstream_text.replacen(
        "          - \"--metadata-header-required=true\"\n",
        "          - \"--metadata-header-required=true\"\n          - \"--allow-network-plugin-kubenet=true\"\n",
        1,
    );
    assert_ne!(edited, upstream_text, "seed 002's edit applies");
    let exceptions =
        std::fs::read_to_string(helm::upstream_manifest("mic-exception.yaml").unwrap()).unwrap();
    kubectl(&c, &["apply", "-f", "-"], Some(&edited));
    c.wait_crds_established().unwrap();
    kubectl(&c, &["apply", "-f", "-"], Some(&exceptions));
    kubectl(&c, &["apply", "-f", "-"], Some(USER_OBJECTS));
    let s1 = snap(&c, &baseline);
    one_of_each(&s1, "upstream applied");
    assert_eq!(
        helm::crd_shape(&c).unwrap(),
        CrdShape::UPSTREAM,
        "upstream's CRDs"
    );
    println!("upstream's manifests: {} objects", s1.len());

    // 2. Ours, as shipped. A server-side dry run first (docs/migration.md).
    let ours_path = repo_root().join("deploy/infra/deployment-rbac.yaml");
    let ours = std::fs::read_to_string(&ours_path).unwrap();
    let dry = kubectl(&c, &["apply", "--dry-run=server", "-f", "-"], Some(&ours));
    for line in [
        "daemonset.apps/nmi configured (server dry run)",
        "deployment.apps/mic configured (server dry run)",
    ] {
        assert!(dry.lines().any(|l| l == line), "{line} not in {dry}");
    }
    let t = Instant::now();
    let out = kubectl(&c, &["apply", "-f", "-"], Some(&ours));
    let took = t.elapsed();
    let s2 = snap(&c, &baseline);
    let up = helm::diff(&s1, &s2);
    println!(
        "kubectl apply of ours over upstream's ({took:.2?}): {}",
        up.figures()
    );
    println!("  replaced: {:?}", up.replaced);
    println!("  created: {:?}", up.created);
    println!("  unchanged: {:?}", up.unchanged);
    one_of_each(&s2, "ours applied");
    assert!(up.recreated.is_empty() && up.deleted.is_empty(), "{up:?}");
    // Every object of upstream's deployment-rbac.yaml is written in place.
    for obj in helm::objects(&helm::parse_documents(&upstream_text).unwrap()) {
        let key = format!(
            "{}/{}/{}",
            obj["kind"].as_str().unwrap(),
            obj["metadata"]["namespace"].as_str().unwrap_or_default(),
            obj["metadata"]["name"].as_str().unwrap()
        );
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
    assert_eq!(helm::crd_shape(&c).unwrap(), CrdShape::OURS, "our CRDs");
    let ds = get_json(&c, &["-n", NS, "daemonset", "nmi"]);
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
    assert!(
        nmi_args(&c)
            .iter()
            .any(|a| a == "--mic-service-accounts=aad-pod-id-mic-service-account"),
        "{:?}",
        nmi_args(&c)
    );
    assert!(!written_lines(&out).is_empty());

    // 3. The same apply again writes nothing.
    let out = kubectl(&c, &["apply", "-f", "-"], Some(&ours));
    let s3 = snap(&c, &baseline);
    let again = helm::diff(&s2, &s3);
    println!("second kubectl apply: {}", again.figures());
    assert_eq!(again.unchanged.len(), s2.len(), "{again:?}");
    // kubectl may still say "configured" where its patch normalises to
    // nothing on the server (no resourceVersion moved, as checked above).
    println!(
        "  kubectl's words for the second apply: {:?}",
        written_lines(&out)
    );

    // 4. The user's own edit carried over by rendering the chart with the
    // same names and their value; upstream's label-based MIC exception deleted.
    // As deploy/infra/generate.sh renders: Helm's own labels left out.
    let mut custom = helm::objects(
        &helm::template(
            &Render::new("aad-pod-identity", NS)
                .with_crds()
                .set("upstreamManifestNames", "true")
                .set("nmi.allowNetworkPluginKubenet", "true"),
        )
        .unwrap(),
    );
    custom.iter_mut().for_each(helm::strip_helm_labels);
    let custom = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": custom});
    kubectl(&c, &["apply", "-f", "-"], Some(&custom.to_string()));
    kubectl(
        &c,
        &[
            "delete",
            "-n",
            NS,
            "azurepodidentityexception",
            "mic-exception",
        ],
        None,
    );
    let s4 = snap(&c, &baseline);
    let edit = helm::diff(&s3, &s4);
    println!(
        "user's edit re-applied, mic-exception deleted: {}",
        edit.figures()
    );
    println!("  replaced: {:?}", edit.replaced);
    one_of_each(&s4, "edit");
    assert!(
        edit.recreated.is_empty() && edit.created.is_empty(),
        "{edit:?}"
    );
    assert_eq!(
        edit.replaced,
        vec![format!("DaemonSet/{NS}/nmi")],
        "only nmi's args differ"
    );
    assert!(
        nmi_args(&c)
            .iter()
            .any(|a| a == "--allow-network-plugin-kubenet=true")
    );

    // 5. Back to upstream: its files again, then the objects it does not have.
    let t = Instant::now();
    kubectl(&c, &["apply", "-f", "-"], Some(&edited));
    kubectl(&c, &["apply", "-f", "-"], Some(&exceptions));
    for args in ROLLBACK_DELETES {
        kubectl(&c, args, None);
    }
    let back_took = t.elapsed();
    let s5 = snap(&c, &baseline);
    let back = helm::diff(&s4, &s5);
    println!(
        "back to upstream's manifests ({back_took:.2?}): {}",
        back.figures()
    );
    println!("  deleted: {:?}", back.deleted);
    one_of_each(&s5, "rolled back");
    assert!(back.recreated.is_empty(), "{back:?}");
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
        assert_eq!(uid(&s5, &key), uid(&s1, &key), "{key}");
    }
    assert!(
        !nmi_args(&c)
            .iter()
            .any(|a| a.starts_with("--mic-service-accounts")),
        "upstream's nmi args again"
    );
    let ds = get_json(&c, &["-n", NS, "daemonset", "nmi"]);
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"],
        serde_json::json!({"maxSurge": 0, "maxUnavailable": 1}),
        "upstream's (the server's defaults) again: {}",
        ds["spec"]["updateStrategy"]
    );
    // Client-side apply removes what the last applied file had and this one
    // lacks: upstream's CRDs again.
    assert_eq!(
        helm::crd_shape(&c).unwrap(),
        CrdShape::UPSTREAM,
        "upstream's CRDs again"
    );

    // 6. The rollback again writes nothing.
    kubectl(&c, &["apply", "-f", "-"], Some(&edited));
    kubectl(&c, &["apply", "-f", "-"], Some(&exceptions));
    let s6 = snap(&c, &baseline);
    let again = helm::diff(&s5, &s6);
    println!("second rollback apply: {}", again.figures());
    assert_eq!(again.unchanged.len(), s5.len(), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_mode_manifest_replaces_upstreams_in_place() {
    let (c, baseline) = helm::bare_private_cluster().await.unwrap();
    let upstream_text =
        std::fs::read_to_string(helm::upstream_manifest("managed-mode-deployment.yaml").unwrap())
            .unwrap();
    kubectl(&c, &["apply", "-f", "-"], Some(&upstream_text));
    c.wait_crds_established().unwrap();
    let s1 = snap(&c, &baseline);
    let only_nmi = |s: &Snapshot, step: &str| {
        assert_eq!(
            helm::workloads(s),
            (vec!["DaemonSet/kube-system/nmi".to_string()], vec![]),
            "{step}"
        );
    };
    only_nmi(&s1, "upstream's managed mode");

    let ours =
        std::fs::read_to_string(repo_root().join("deploy/infra/managed-mode-deployment.yaml"))
            .unwrap();
    let t = Instant::now();
    kubectl(&c, &["apply", "-f", "-"], Some(&ours));
    let took = t.elapsed();
    let s2 = snap(&c, &baseline);
    let up = helm::diff(&s1, &s2);
    println!(
        "managed mode: kubectl apply of ours over upstream's ({took:.2?}): {}",
        up.figures()
    );
    println!("  created: {:?}", up.created);
    only_nmi(&s2, "ours applied");
    assert!(up.recreated.is_empty() && up.deleted.is_empty(), "{up:?}");
    assert_eq!(
        up.replaced.len(),
        s1.len(),
        "every upstream object in place: {up:?}"
    );

    kubectl(&c, &["apply", "-f", "-"], Some(&ours));
    let again = helm::diff(&s2, &snap(&c, &baseline));
    println!("managed mode, second apply: {}", again.figures());
    assert_eq!(again.unchanged.len(), s2.len(), "{again:?}");
}
