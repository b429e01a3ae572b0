//! Namespace-scoped users and what they (or an administrator) do and see:
//! namespaces with the identity policy's grant, RoleBindings to `edit` and
//! the chart's `<fullname>-edit`, `kubectl` as a user, Events.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use aadpodid_api::policy::ANNOTATION_ALLOWED_IDENTITIES;
use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Event, Namespace};
use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::Client;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

use super::World;
use crate::kubectl::{KubectlOutput, client_from_kubeconfig, run_kubectl};

/// A namespace-scoped user: ServiceAccount `user` of its own namespace,
/// bound there (RoleBindings) to the built-in `edit` ClusterRole and the
/// chart's `<fullname>-edit` ClusterRole, and to nothing else.
#[derive(Clone, Debug)]
pub struct NsUser {
    /// The user's namespace.
    pub namespace: String,
    /// The ServiceAccount's name.
    pub name: String,
    /// A kubeconfig that authenticates as the ServiceAccount.
    pub kubeconfig: PathBuf,
}

impl NsUser {
    /// The user name the apiserver sees.
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }

    /// A client acting as the user (bound to the calling runtime).
    pub async fn client(&self) -> anyhow::Result<Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }
}

/// Creates Namespace `name` (an administrator's act), with the identity
/// policy's grant annotation when `grants` is given; an existing one gets
/// the annotation set (or removed for `None`).
pub(super) async fn create_namespace(
    client: &Client,
    name: &str,
    grants: Option<&str>,
) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    if api.get_opt(name).await?.is_some() {
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                ANNOTATION_ALLOWED_IDENTITIES: grants,
            }}})),
        )
        .await?;
        return Ok(());
    }
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: grants.map(|g| {
                BTreeMap::from([(ANNOTATION_ALLOWED_IDENTITIES.to_string(), g.to_string())])
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    api.create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("create namespace {name}"))?;
    Ok(())
}

/// One ClusterRole selector of an aggregation rule matches `labels`
/// (`matchLabels` only, the form every aggregated role here uses).
fn aggregation_matches(selectors: &[LabelSelector], labels: &BTreeMap<String, String>) -> bool {
    selectors.iter().any(|s| {
        s.match_expressions.as_ref().is_none_or(Vec::is_empty)
            && s.match_labels
                .as_ref()
                .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels.get(k) == Some(v)))
    })
}

/// What ClusterRole aggregation makes of `roles`: every role with an
/// `aggregationRule` gets the rules of the roles its selectors match,
/// repeated until nothing changes (aggregated roles aggregate each other);
/// returns the indexes of the roles that changed.
fn aggregate(roles: &mut [ClusterRole]) -> BTreeSet<usize> {
    let mut changed = BTreeSet::new();
    // Bounded by the role count: each round adds to at least one role.
    for _ in 0..=roles.len() {
        let mut any = false;
        for i in 0..roles.len() {
            let Some(selectors) = roles[i]
                .aggregation_rule
                .as_ref()
                .and_then(|a| a.cluster_role_selectors.clone())
            else {
                continue;
            };
            let mut rules = roles[i].rules.clone().unwrap_or_default();
            for (j, other) in roles.iter().enumerate() {
                let labels = other.metadata.labels.clone().unwrap_or_default();
                if j == i || !aggregation_matches(&selectors, &labels) {
                    continue;
                }
                for r in other.rules.iter().flatten() {
                    if !rules.contains(r) {
                        rules.push(r.clone());
                        any = true;
                        changed.insert(i);
                    }
                }
            }
            roles[i].rules = Some(rules);
        }
        if !any {
            break;
        }
    }
    changed
}

impl World {
    /// Does what kube-controller-manager's ClusterRole aggregation would (no
    /// controller-manager runs here): every ClusterRole with an
    /// `aggregationRule` (the built-in `admin`, `edit`, `view`) gets the rules
    /// of the ClusterRoles its selectors match, the chart's user-facing roles
    /// included. Idempotent.
    pub async fn aggregate_cluster_roles(&self) -> anyhow::Result<()> {
        let api: Api<ClusterRole> = Api::all(self.client().await?);
        let mut roles = api.list(&ListParams::default()).await?.items;
        for i in aggregate(&mut roles) {
            let name = roles[i].metadata.name.clone().context("ClusterRole name")?;
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"rules": roles[i].rules})),
            )
            .await
            .with_context(|| format!("aggregate ClusterRole {name}"))?;
        }
        Ok(())
    }

    /// Name of the chart's user-facing edit ClusterRole (rendered with
    /// `rbac.createUserFacingClusterRoles=true`).
    pub fn user_facing_edit_role(&self) -> anyhow::Result<String> {
        self.rendered
            .iter()
            .filter(|d| d["kind"] == "ClusterRole")
            .filter_map(|d| d["metadata"]["name"].as_str())
            .find(|n| n.ends_with("-edit"))
            .map(str::to_string)
            .context("the chart rendered no <fullname>-edit ClusterRole (set rbac.createUserFacingClusterRoles=true)")
    }

    /// Creates Namespace `name` (an administrator's act), with the identity
    /// policy's grant annotation when `grants` is given; an existing one gets
    /// the annotation set (or removed for `None`).
    pub async fn create_namespace(&self, name: &str, grants: Option<&str>) -> anyhow::Result<()> {
        create_namespace(&self.client().await?, name, grants).await
    }

    /// A namespace-scoped user in namespace `namespace` (created, with
    /// `grants` as in [`World::create_namespace`]): see [`NsUser`]. Also
    /// runs [`World::aggregate_cluster_roles`], so `edit` holds what it
    /// holds on a real cluster.
    pub async fn namespace_user(
        &self,
        namespace: &str,
        grants: Option<&str>,
    ) -> anyhow::Result<NsUser> {
        let chart_edit = self.user_facing_edit_role()?;
        self.create_namespace(namespace, grants).await?;
        self.aggregate_cluster_roles().await?;
        let name = "user";
        let kubeconfig = self
            .cluster
            .service_account_kubeconfig(namespace, name)
            .await?;
        let bindings: Api<RoleBinding> = Api::namespaced(self.client().await?, namespace);
        for role in ["edit", chart_edit.as_str()] {
            let rb: RoleBinding = serde_json::from_value(json!({
                "metadata": {"name": format!("{name}-{role}")},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
            }))?;
            bindings
                .create(&PostParams::default(), &rb)
                .await
                .with_context(|| format!("bind {name} to {role} in {namespace}"))?;
        }
        Ok(NsUser {
            namespace: namespace.into(),
            name: name.into(),
            kubeconfig,
        })
    }

    /// `kubectl <args>` with `stdin`, as `user` (the administrator for
    /// `None`), bounded by `--request-timeout 30s`.
    pub async fn kubectl_as(
        &self,
        user: Option<&NsUser>,
        args: &[&str],
        stdin: Option<&str>,
    ) -> anyhow::Result<KubectlOutput> {
        let cmd = match user {
            Some(u) => self.cluster.kubectl_with(&u.kubeconfig),
            None => self.cluster.kubectl(),
        };
        tokio::task::block_in_place(|| run_kubectl(cmd, args, stdin))
    }

    /// The Events of `namespace` as `client` may list them, one line each:
    /// `<Kind>/<name> <type> <reason>: <message>`.
    pub async fn events_in(&self, client: &Client, namespace: &str) -> anyhow::Result<Vec<String>> {
        let api: Api<Event> = Api::namespaced(client.clone(), namespace);
        Ok(api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(|e| {
                format!(
                    "{}/{} {} {}: {}",
                    e.involved_object.kind.unwrap_or_default(),
                    e.involved_object.name.unwrap_or_default(),
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.message.unwrap_or_default()
                )
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::rbac::v1::{AggregationRule, PolicyRule};

    /// A ClusterRole with one label, one rule per verb, and an aggregation
    /// rule selecting `<aggregates>=true` when given.
    fn role(
        name: &str,
        label: Option<&str>,
        verbs: &[&str],
        aggregates: Option<&str>,
    ) -> ClusterRole {
        let true_label = |l: &str| BTreeMap::from([(l.to_string(), "true".to_string())]);
        ClusterRole {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: label.map(true_label),
                ..Default::default()
            },
            aggregation_rule: aggregates.map(|l| AggregationRule {
                cluster_role_selectors: Some(vec![LabelSelector {
                    match_labels: Some(true_label(l)),
                    match_expressions: None,
                }]),
            }),
            rules: Some(
                verbs
                    .iter()
                    .map(|v| PolicyRule {
                        verbs: vec![v.to_string()],
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    #[test]
    fn aggregated_roles_take_the_rules_of_the_roles_they_select_transitively() {
        let mut roles = vec![
            role("admin", None, &[], Some("to-admin")),
            role("edit", Some("to-admin"), &[], Some("to-edit")),
            role("view", Some("to-edit"), &["get"], Some("to-view")),
            role("chart-view", Some("to-view"), &["list"], None),
            role("other", Some("x"), &["delete"], None),
        ];
        let changed = aggregate(&mut roles);
        assert_eq!(changed, BTreeSet::from([0, 1, 2]));
        let verbs = |r: &ClusterRole| -> BTreeSet<String> {
            r.rules
                .iter()
                .flatten()
                .flat_map(|p| p.verbs.clone())
                .collect()
        };
        for r in &roles[..3] {
            assert_eq!(verbs(r), BTreeSet::from(["get".into(), "list".into()]));
        }
        assert_eq!(verbs(&roles[4]), BTreeSet::from(["delete".into()]));
        assert!(aggregate(&mut roles).is_empty(), "idempotent");
    }
}
