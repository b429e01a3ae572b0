//! The CRDs on a real apiserver: they install and become Established, the
//! user's manifests apply unchanged with a real kubectl and read back through
//! the Rust types, kubectl shows upstream's printer columns, and invalid
//! objects are refused with a clear message.

use aadpodid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureAssignedIdentitySpec,
    AzureAssignedIdentityStatus, AzureIdentity, AzureIdentityBinding, IdentityType,
    POD_LABEL_BINDING,
};
use aadpodid_tests::{Cluster, TempNamespace, fill_template, fixture};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};

const UAI_ID: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-uai/providers/Microsoft.ManagedIdentity/userAssignedIdentities/uai-kv";
const UAI_CLIENT_ID: &str = "7c8e5e33-2b4a-4a36-8a3c-5d0b6e1f2a9d";

/// The seed-002 variables as Terraform's templatefile would fill them.
fn seed002_vars() -> [(&'static str, &'static str); 4] {
    [
        ("UAIName", "uai-kv"),
        ("UAIId", UAI_ID),
        ("UAIClientId", UAI_CLIENT_ID),
        ("KVName", "kv-demo"),
    ]
}

fn apply(cluster: &Cluster, ns: &str, manifest: &str) -> anyhow::Result<()> {
    let out = cluster.kubectl_run(&["apply", "-n", ns, "-f", "-"], Some(manifest))?;
    anyhow::ensure!(
        out.success,
        "kubectl apply failed:\n{}\n{manifest}",
        out.stderr
    );
    Ok(())
}

/// Applies seed-002 fixtures, filled in as Terraform would, in order.
fn apply_seed002(cluster: &Cluster, ns: &str, files: &[&str]) -> anyhow::Result<()> {
    let vars = seed002_vars();
    for file in files {
        apply(cluster, ns, &fill_template(&fixture(file)?, &vars))?;
    }
    Ok(())
}

/// Applies the seed-002 AzureIdentity and AzureIdentityBinding and reads
/// them back.
async fn seed002_identity_and_binding(
    cluster: &Cluster,
    ns: &str,
) -> anyhow::Result<(AzureIdentity, AzureIdentityBinding)> {
    apply_seed002(
        cluster,
        ns,
        &[
            "seed002-azureidentity.yaml",
            "seed002-azureidentitybinding.yaml",
        ],
    )?;
    let client = cluster.admin_client().await?;
    let id = Api::<AzureIdentity>::namespaced(client.clone(), ns)
        .get("uai-kv")
        .await?;
    let binding = Api::<AzureIdentityBinding>::namespaced(client, ns)
        .get("uai-kv-binding")
        .await?;
    Ok((id, binding))
}

/// `kubectl get <resource> -n <ns>`: the columns of the header and of the
/// first row.
fn table(
    cluster: &Cluster,
    resource: &str,
    ns: &str,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let out = cluster.kubectl_run(&["get", resource, "-n", ns], None)?;
    anyhow::ensure!(out.success, "{}", out.stderr);
    let mut lines = out
        .stdout
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>());
    let header = lines.next().unwrap_or_default();
    let row = lines.next().unwrap_or_default();
    Ok((header, row))
}

/// The shared cluster and a namespace of its own for one test.
async fn cluster_and_namespace(prefix: &str) -> anyhow::Result<(&'static Cluster, TempNamespace)> {
    let cluster = Cluster::shared();
    Ok((cluster, cluster.temp_namespace(prefix).await?))
}

#[tokio::test]
async fn crds_are_established_and_namespaced() -> anyhow::Result<()> {
    let cluster = Cluster::shared();
    let api: Api<CustomResourceDefinition> = Api::all(cluster.admin_client().await?);
    for plural in [
        "azureidentities",
        "azureidentitybindings",
        "azureassignedidentities",
        "azurepodidentityexceptions",
    ] {
        let crd = api.get(&format!("{plural}.aadpodidentity.k8s.io")).await?;
        assert_eq!(crd.spec.scope, "Namespaced");
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "{plural} is not Established");
    }
    Ok(())
}

#[tokio::test]
async fn seed_manifests_apply_unchanged_and_read_back() -> anyhow::Result<()> {
    let (cluster, ns) = cluster_and_namespace("seed002").await?;
    apply_seed002(
        cluster,
        ns.name(),
        &[
            "seed002-azureidentity.yaml",
            "seed002-azureidentitybinding.yaml",
            "seed002-pod.yaml",
        ],
    )?;

    let client = cluster.admin_client().await?;
    let id = Api::<AzureIdentity>::namespaced(client.clone(), ns.name())
        .get("uai-kv")
        .await?;
    assert_eq!(id.spec.r#type, IdentityType::UserAssignedMsi);
    assert_eq!(id.spec.resource_id, UAI_ID);
    assert_eq!(id.spec.client_id, UAI_CLIENT_ID);

    let binding = Api::<AzureIdentityBinding>::namespaced(client.clone(), ns.name())
        .get("uai-kv-binding")
        .await?;
    assert_eq!(binding.spec.azure_identity, "uai-kv");
    assert_eq!(binding.spec.selector, "uai-kv-binding");

    let pod = Api::<Pod>::namespaced(client, ns.name())
        .get("nginx-secrets-store-inline")
        .await?;
    let label = pod
        .metadata
        .labels
        .unwrap_or_default()
        .remove(POD_LABEL_BINDING);
    assert_eq!(
        label.as_deref(),
        Some(binding.spec.selector.as_str()),
        "pod is selected by the binding"
    );
    Ok(())
}

#[tokio::test]
async fn seed004_pod_applies_unchanged() -> anyhow::Result<()> {
    let (cluster, ns) = cluster_and_namespace("seed004").await?;
    let manifest = fill_template(
        &fixture("seed004-pod.yaml")?,
        &[
            ("POD_IDENTITY_NAME", "my-pod-identity"),
            ("SUBSCRIPTION_ID", "00000000-0000-0000-0000-000000000001"),
            ("IDENTITY_CLIENT_ID", UAI_CLIENT_ID),
            ("IDENTITY_RESOURCE_GROUP", "myIdentityResourceGroup"),
        ],
    );
    apply(cluster, ns.name(), &manifest)?;
    let pod = Api::<Pod>::namespaced(cluster.admin_client().await?, ns.name())
        .get("demo")
        .await?;
    let labels = pod.metadata.labels.unwrap_or_default();
    assert_eq!(
        labels.get(POD_LABEL_BINDING).map(String::as_str),
        Some("my-pod-identity")
    );
    Ok(())
}

#[tokio::test]
async fn kubectl_get_shows_upstream_printer_columns() -> anyhow::Result<()> {
    let (cluster, ns) = cluster_and_namespace("columns").await?;
    seed002_identity_and_binding(cluster, ns.name()).await?;

    let (header, row) = table(cluster, "azureidentities", ns.name())?;
    assert_eq!(header, ["NAME", "TYPE", "CLIENTID", "AGE"]);
    assert_eq!(&row[..3], ["uai-kv", "0", UAI_CLIENT_ID]);

    let (header, row) = table(cluster, "azureidentitybindings", ns.name())?;
    assert_eq!(header, ["NAME", "AZUREIDENTITY", "SELECTOR", "AGE"]);
    assert_eq!(&row[..3], ["uai-kv-binding", "uai-kv", "uai-kv-binding"]);
    Ok(())
}

#[tokio::test]
async fn invalid_identity_type_is_refused_with_a_clear_message() -> anyhow::Result<()> {
    let (cluster, ns) = cluster_and_namespace("invalid").await?;
    for (value, expect) in [
        ("\"abc\"", "spec.type"),
        ("5", "spec.type"),
        ("-1", "spec.type"),
    ] {
        let manifest = format!(
            "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\nmetadata:\n  name: bad\nspec:\n  type: {value}\n  clientID: c\n"
        );
        let out = cluster.kubectl_run(&["apply", "-n", ns.name(), "-f", "-"], Some(&manifest))?;
        assert!(!out.success, "type {value} was accepted");
        assert!(
            out.stderr.contains(expect) && out.stderr.contains("Invalid value"),
            "{}",
            out.stderr
        );
    }
    let ids = Api::<AzureIdentity>::namespaced(cluster.admin_client().await?, ns.name());
    assert!(ids.get_opt("bad").await?.is_none(), "nothing was stored");
    Ok(())
}

#[tokio::test]
async fn assigned_identity_with_embedded_refs_round_trips() -> anyhow::Result<()> {
    let (cluster, ns) = cluster_and_namespace("aai").await?;
    let (id, binding) = seed002_identity_and_binding(cluster, ns.name()).await?;
    let client = cluster.admin_client().await?;

    let name = aadpodid_api::assigned_identity_name("web", ns.name(), "uai-kv");
    let mut aai = AzureAssignedIdentity::new(
        &name,
        AzureAssignedIdentitySpec {
            azure_identity_ref: Some(Box::new(id.clone())),
            azure_binding_ref: Some(Box::new(binding.clone())),
            pod: "web".into(),
            pod_namespace: ns.name().into(),
            node_name: "node-0".into(),
            replicas: None,
        },
    );
    aai.status = Some(AzureAssignedIdentityStatus {
        status: AssignedIdentityState::Created.to_string(),
        available_replicas: 1,
    });
    let api = Api::<AzureAssignedIdentity>::namespaced(client, ns.name());
    api.create(&PostParams::default(), &aai).await?;

    let back = api.get(&name).await?;
    assert_eq!(
        back.state(),
        Some(AssignedIdentityState::Created),
        "status is stored with the object"
    );
    let back_id = back
        .spec
        .azure_identity_ref
        .expect("embedded identity kept");
    assert_eq!(back_id.spec, id.spec);
    assert_eq!(back_id.metadata.name, id.metadata.name);
    assert_eq!(back_id.metadata.namespace, id.metadata.namespace);
    let back_binding = back.spec.azure_binding_ref.expect("embedded binding kept");
    assert_eq!(back_binding.spec, binding.spec);
    assert_eq!(back.spec.node_name, "node-0");

    let (header, row) = table(cluster, "azureassignedidentities", ns.name())?;
    assert_eq!(
        header,
        [
            "NAME",
            "POD",
            "PODNAMESPACE",
            "IDENTITY",
            "NODE",
            "STATUS",
            "AGE"
        ]
    );
    assert!(row.iter().any(|c| c == "Created"), "{row:?}");
    Ok(())
}

#[tokio::test]
async fn kubectl_explain_shows_the_doc_comments() -> anyhow::Result<()> {
    let cluster = Cluster::shared();
    let out = cluster.kubectl_run(&["explain", "azureidentity.spec.type"], None)?;
    assert!(out.success, "{}", out.stderr);
    assert!(
        out.stdout.contains("0 user-assigned managed identity"),
        "{}",
        out.stdout
    );
    let out = cluster.kubectl_run(&["explain", "azureidentitybinding.spec.selector"], None)?;
    assert!(out.success, "{}", out.stderr);
    assert!(out.stdout.contains("aadpodidbinding"), "{}", out.stdout);
    Ok(())
}
