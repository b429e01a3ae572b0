//! The harness itself: RBAC is enforced, ServiceAccount clients carry only the
//! rights tests grant them, and temporary namespaces go away.

use std::time::Duration;

use aadpodid_api::AzureIdentity;
use aadpodid_tests::{Cluster, wait_for};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};

#[tokio::test]
async fn service_account_client_is_limited_by_rbac() -> anyhow::Result<()> {
    let cluster = Cluster::shared();
    let ns = cluster.temp_namespace("rbac").await?;
    let sa_client = cluster.service_account_client(ns.name(), "reader").await?;
    let ids: Api<AzureIdentity> = Api::namespaced(sa_client, ns.name());

    let err = ids
        .list(&ListParams::default())
        .await
        .expect_err("no role yet: must be forbidden");
    match err {
        kube::Error::Api(status) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("expected a 403 from the apiserver, got {other:?}"),
    }

    let admin = cluster.admin_client().await?;
    let meta = |name: &str| ObjectMeta {
        name: Some(name.into()),
        ..Default::default()
    };
    Api::<Role>::namespaced(admin.clone(), ns.name())
        .create(
            &PostParams::default(),
            &Role {
                metadata: meta("read-identities"),
                rules: Some(vec![PolicyRule {
                    api_groups: Some(vec![aadpodid_api::GROUP.into()]),
                    resources: Some(vec!["azureidentities".into()]),
                    verbs: vec!["get".into(), "list".into()],
                    ..Default::default()
                }]),
            },
        )
        .await?;
    Api::<RoleBinding>::namespaced(admin, ns.name())
        .create(
            &PostParams::default(),
            &RoleBinding {
                metadata: meta("reader"),
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "Role".into(),
                    name: "read-identities".into(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".into(),
                    name: "reader".into(),
                    namespace: Some(ns.name().into()),
                    ..Default::default()
                }]),
            },
        )
        .await?;

    // RBAC caches refresh within moments; bounded wait.
    wait_for(
        "the Role to take effect",
        Duration::from_secs(10),
        || async { ids.list(&ListParams::default()).await.ok() },
    )
    .await?;

    // Still nothing beyond the grant: no writes, no other namespace.
    let write = ids
        .create(
            &PostParams::default(),
            &AzureIdentity::new("x", Default::default()),
        )
        .await;
    assert!(
        matches!(write, Err(kube::Error::Api(ref s)) if s.code == 403),
        "{write:?}"
    );
    Ok(())
}

#[tokio::test]
async fn kubectl_as_a_service_account_is_refused_without_rights() -> anyhow::Result<()> {
    let cluster = Cluster::shared();
    let ns = cluster.temp_namespace("kubectl-sa").await?;
    let kubeconfig = cluster
        .service_account_kubeconfig(ns.name(), "nobody")
        .await?;
    let out = cluster
        .kubectl_with(&kubeconfig)
        .args(["get", "azureidentities", "-n", ns.name()])
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("forbidden"), "{stderr}");
    assert!(
        stderr.contains(&format!("system:serviceaccount:{}:nobody", ns.name())),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn apiserver_reports_the_pinned_release() -> anyhow::Result<()> {
    let cluster = Cluster::shared();
    let version = cluster.admin_client().await?.apiserver_version().await?;
    assert_eq!(version.git_version, aadpodid_tests::KUBERNETES_VERSION);
    let out = cluster.kubectl_run(&["version", "-o", "json"], None)?;
    assert!(out.success, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout)?;
    assert_eq!(
        v["clientVersion"]["gitVersion"],
        aadpodid_tests::KUBERNETES_VERSION
    );
    Ok(())
}

#[tokio::test]
async fn temp_namespace_is_deleted_on_drop() -> anyhow::Result<()> {
    let cluster = Cluster::shared();
    let name = {
        let ns = cluster.temp_namespace("dropped").await?;
        ns.name().to_string()
    };
    let api: Api<Namespace> = Api::all(cluster.admin_client().await?);
    // No namespace controller runs, so "deleted" means marked for deletion.
    wait_for(
        "namespace marked for deletion",
        Duration::from_secs(10),
        || async {
            match api.get_opt(&name).await {
                Ok(None) => Some(()),
                Ok(Some(ns)) => ns.metadata.deletion_timestamp.map(|_| ()),
                Err(_) => None,
            }
        },
    )
    .await?;
    Ok(())
}
