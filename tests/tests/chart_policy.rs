//! The chart's identity policy at admission, on the real apiserver: the
//! rendered ValidatingAdmissionPolicies and bindings, the chart's user-facing
//! roles and MIC's RBAC are applied, and a namespace user (a ServiceAccount
//! bound in its own namespace to the built-in `edit` ClusterRole and to the
//! chart's `-view`/`-edit` roles, bound directly since no controller-manager
//! aggregates them here) tries each way around the policy:
//! - warn: an AzureIdentity naming an identity not granted to its namespace
//!   is admitted and `kubectl apply` prints why it would be refused; the seed
//!   manifests still apply unchanged;
//! - enforce: it is refused with a message naming the namespace, the
//!   resourceID and the annotation, and nothing is stored; exact and `*`
//!   grants admit it, and the CEL grant rule answers like
//!   `aadpodid_api::identity_granted` on a table of cases;
//! - AzureAssignedIdentities: refused for the user even with RBAC for them,
//!   and for a cluster admin; admitted for MIC's ServiceAccount;
//! - AzurePodIdentityExceptions: refused for the user given RBAC for them by a
//!   RoleBinding; admitted for a cluster admin and for an account given the
//!   verb by a ClusterRoleBinding.
//!
//! - nmi.startupTaint: NMI's ServiceAccount, with a pod-bound token naming
//!   its node, may remove the startup taint from that node (with NMI's own
//!   patch) and make no other Node write.
//!
//! Each test renders its own release (names of its own) and binds the
//! policies only to namespaces labelled for it, so that tests running at the
//! same time in this binary do not see each other's policies.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers outside #[test] functions fail the test by panicking"
)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use aadpodid_api::policy::{ANNOTATION_ALLOWED_IDENTITIES, identity_granted};
use aadpodid_tests::helm::{self, Render};
use aadpodid_tests::{
    Cluster, KubectlOutput, SUB, fill_template, fixture, run_kubectl, unique_name, wait_for,
};
use serde_json::{Value, json};

/// Label that puts a namespace under one test's policy bindings.
const SCOPE_LABEL: &str = "aadpodid-test/policy-release";
/// Bound on the apiserver's policy and namespace informers catching up.
const SETTLE: Duration = Duration::from_secs(30);

const CLIENT: &str = "c0000000-0000-4000-8000-000000000001";

fn uai(rg: &str, name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

fn run(cmd: Command, args: &[&str], stdin: Option<&str>) -> KubectlOutput {
    run_kubectl(cmd, args, stdin).unwrap()
}

/// A namespace created with its labels and annotations in one request (so
/// the apiserver's informers never see it without them), deleted on drop.
struct Ns {
    name: String,
    cluster: &'static Cluster,
}

impl Ns {
    fn create(cluster: &'static Cluster, prefix: &str, scope: &str, grant: Option<&str>) -> Ns {
        let name = unique_name(prefix);
        let mut meta = json!({"name": name, "labels": {SCOPE_LABEL: scope}});
        if let Some(g) = grant {
            meta["annotations"] = json!({ANNOTATION_ALLOWED_IDENTITIES: g});
        }
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": meta});
        let out = cluster
            .kubectl_run(&["create", "-f", "-"], Some(&ns.to_string()))
            .unwrap();
        assert!(out.success, "create namespace {name}: {}", out.stderr);
        Ns { name, cluster }
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = self.cluster.kubectl_run(
            &[
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ],
            None,
        );
    }
}

/// Cluster-scoped objects (kind, name) a test made, deleted on drop.
struct Doomed {
    cluster: &'static Cluster,
    objects: Vec<(String, String)>,
}

impl Drop for Doomed {
    fn drop(&mut self) {
        for (kind, name) in &self.objects {
            let _ = self
                .cluster
                .kubectl_run(&["delete", kind, name, "--ignore-not-found"], None);
        }
    }
}

/// One rendered release whose policies, user-facing roles and MIC RBAC are
/// applied, a user namespace, and the namespace user in it.
struct World {
    cluster: &'static Cluster,
    /// Cluster-scoped objects, deleted on drop (before the namespaces).
    cluster_scoped: Doomed,
    name: String,
    rel_ns: Ns,
    user_ns: Ns,
    /// Kubeconfig of ServiceAccount `editor` in the user namespace.
    editor: PathBuf,
}

impl World {
    async fn new(prefix: &str, mode: &str) -> World {
        let cluster = Cluster::shared();
        let name = unique_name(prefix);
        let rel_ns = Ns::create(cluster, &format!("{prefix}-rel"), &name, None);
        let user_ns = Ns::create(cluster, &format!("{prefix}-user"), &name, None);
        let docs = helm::template(
            &Render::new(&name, &rel_ns.name)
                .set("fullnameOverride", &name)
                .set("mic.leaderElection.namespace", &rel_ns.name)
                .set("rbac.createUserFacingClusterRoles", "true")
                .set("identityPolicy.mode", mode),
        )
        .unwrap();
        let mut world = World {
            cluster,
            name: name.clone(),
            rel_ns,
            user_ns,
            editor: PathBuf::new(),
            cluster_scoped: Doomed {
                cluster,
                objects: vec![],
            },
        };
        let mic = format!("{name}-mic");
        let mut items = vec![];
        for o in helm::objects(&docs) {
            let kind = o["kind"].as_str().unwrap().to_string();
            let oname = o["metadata"]["name"].as_str().unwrap().to_string();
            let wanted = match kind.as_str() {
                "ValidatingAdmissionPolicy" | "ValidatingAdmissionPolicyBinding" => true,
                "ClusterRole" => {
                    oname == mic
                        || oname == format!("{name}-view")
                        || oname == format!("{name}-edit")
                }
                "ClusterRoleBinding" | "ServiceAccount" => oname == mic,
                _ => false,
            };
            if !wanted {
                continue;
            }
            let mut o = o.clone();
            if kind == "ValidatingAdmissionPolicyBinding" {
                assert!(
                    o["spec"]["matchResources"].is_null(),
                    "the chart binds its policies cluster-wide: {o}"
                );
                o["spec"]["matchResources"] =
                    json!({"namespaceSelector": {"matchLabels": {SCOPE_LABEL: name}}});
            }
            if kind != "ServiceAccount" {
                world
                    .cluster_scoped
                    .objects
                    .push((kind.to_lowercase(), oname.clone()));
            }
            items.push(o);
        }
        let policies = items
            .iter()
            .filter(|o| o["kind"] == "ValidatingAdmissionPolicy")
            .count();
        if mode == "off" {
            assert_eq!(policies, 0, "mode off installs no admission policy");
        } else {
            assert_eq!(policies, 3, "{items:?}");
        }
        world.apply_admin(&json!({"apiVersion": "v1", "kind": "List", "items": items}));
        // The namespace user: built-in edit and what kube-controller-manager
        // would aggregate into it (which does not run here, so edit itself
        // is empty): system:aggregate-to-edit and -to-view, and the chart's
        // -view and -edit.
        let user = world.user_ns.name.clone();
        let mut bindings = vec![];
        for role in [
            "edit".to_string(),
            "system:aggregate-to-edit".to_string(),
            "system:aggregate-to-view".to_string(),
            format!("{name}-view"),
            format!("{name}-edit"),
        ] {
            bindings.push(role_binding(
                &user,
                &format!("editor-{}", role.replace(':', "-")),
                "ClusterRole",
                &role,
            ));
        }
        world.editor = cluster
            .service_account_kubeconfig(&user, "editor")
            .await
            .unwrap();
        world.apply_admin(&json!({"apiVersion": "v1", "kind": "List", "items": bindings}));
        world
    }

    fn user(&self) -> &str {
        &self.user_ns.name
    }

    fn policy(&self, which: &str) -> String {
        format!("{}-{which}", self.name)
    }

    fn apply_admin(&self, obj: &Value) {
        let out = self
            .cluster
            .kubectl_run(
                &["apply", "--server-side", "-f", "-"],
                Some(&obj.to_string()),
            )
            .unwrap();
        assert!(out.success, "apply: {}\n{obj}", out.stderr);
    }

    /// kubectl as the namespace user.
    fn as_editor(&self, args: &[&str], stdin: Option<&str>) -> KubectlOutput {
        run(self.cluster.kubectl_with(&self.editor), args, stdin)
    }

    fn as_admin(&self, args: &[&str], stdin: Option<&str>) -> KubectlOutput {
        self.cluster.kubectl_run(args, stdin).unwrap()
    }

    /// `kubectl apply` of `obj` as the namespace user.
    fn editor_apply(&self, obj: &Value) -> KubectlOutput {
        self.as_editor(&["apply", "-f", "-"], Some(&obj.to_string()))
    }

    /// Waits until the identity-grants policy acts on an admin's dry run of
    /// an AzureIdentity `probe` naming `resource_id` in the user namespace.
    async fn wait_grants_policy_acts(&self, resource_id: &str) {
        self.wait_policy_acts(
            &|a, s| self.as_admin(a, s),
            &identity(self.user(), "probe", resource_id),
            &self.policy("identity-grants"),
        )
        .await;
    }

    /// `kubectl auth can-i create <resource>` in the user namespace, as the
    /// namespace user.
    fn editor_can_create(&self, resource: &str) -> KubectlOutput {
        self.as_editor(
            &["auth", "can-i", "create", resource, "-n", self.user()],
            None,
        )
    }

    /// A Role `name` in the user namespace with every verb on `resource` of
    /// the project's API group, bound to the namespace user.
    fn grant_editor(&self, name: &str, resource: &str) {
        let user = self.user();
        let role = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": name, "namespace": user},
            "rules": [{"apiGroups": ["aadpodidentity.k8s.io"], "resources": [resource],
                       "verbs": ["get", "list", "create", "update", "patch", "delete"]}],
        });
        self.apply_admin(&json!({"apiVersion": "v1", "kind": "List", "items": [
            role, role_binding(user, name, "Role", name)]}));
    }

    /// Whether `kind/name` exists in the user namespace (admin view).
    fn exists(&self, kind: &str, name: &str) -> bool {
        self.as_admin(&["get", kind, name, "-n", self.user(), "-o", "name"], None)
            .success
    }

    /// Waits until a server-side dry run of `obj` by `who` shows `policy`
    /// acting (denied, or a warning naming it): the apiserver loads policies
    /// and bindings through informers, a few seconds after they are applied.
    async fn wait_policy_acts(
        &self,
        who: &dyn Fn(&[&str], Option<&str>) -> KubectlOutput,
        obj: &Value,
        policy: &str,
    ) {
        let text = obj.to_string();
        let r = wait_for(&format!("policy {policy} acting"), SETTLE, || {
            let out = who(&["create", "--dry-run=server", "-f", "-"], Some(&text));
            let acted = out.stderr.contains(&format!("'{policy}'"));
            async move { acted.then_some(()) }
        })
        .await;
        r.unwrap();
    }
}

/// Arguments of `kubectl patch <kind> <name> -n <ns> --type=merge -p <patch>`.
fn merge_patch<'a>(kind: &'a str, name: &'a str, ns: &'a str, patch: &'a str) -> [&'a str; 8] {
    ["patch", kind, name, "-n", ns, "--type=merge", "-p", patch]
}

fn role_binding(ns: &str, name: &str, kind: &str, role: &str) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": "editor", "namespace": ns}],
    })
}

fn identity(ns: &str, name: &str, resource_id: &str) -> Value {
    json!({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"type": 0, "resourceID": resource_id, "clientID": CLIENT},
    })
}

fn assigned_identity(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureAssignedIdentity",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"pod": "web", "podNamespace": ns, "nodename": "node-0"},
        "status": {"status": "Assigned"},
    })
}

fn exception(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzurePodIdentityException",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"podLabels": {"app": name}},
    })
}

/// The admission message for an ungranted identity names what the user and
/// the administrator need.
fn assert_grant_message(text: &str, ns: &str, resource_id: &str) {
    for want in [
        format!("namespace {ns} is not granted the identity {resource_id}"),
        ANNOTATION_ALLOWED_IDENTITIES.to_string(),
        format!("kubectl annotate namespace {ns}"),
    ] {
        assert!(text.contains(&want), "{want:?} missing from:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warn_mode_admits_an_ungranted_identity_and_says_why() {
    let w = World::new("pol-warn", "warn").await;
    let user = w.user().to_string();
    let id = uai("other-team", "their-id");
    w.wait_grants_policy_acts(&id).await;

    let out = w.editor_apply(&identity(&user, "app-id", &id));
    assert!(out.success, "warn mode admits it: {}", out.stderr);
    assert!(out.stderr.contains("Warning"), "{}", out.stderr);
    assert_grant_message(&out.stderr, &user, &id);
    assert!(
        out.stderr.contains("refused in enforce mode"),
        "{}",
        out.stderr
    );
    assert!(w.exists("azureidentity", "app-id"));

    // The other two policies deny in warn mode too.
    let aai = w.as_admin(
        &["create", "-f", "-"],
        Some(&assigned_identity(&user, "forged").to_string()),
    );
    assert!(!aai.success, "{}", aai.stdout);
    assert!(aai.stderr.contains("written only by MIC"), "{}", aai.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_mode_refuses_ungranted_identities_and_admits_granted_ones() {
    let w = World::new("pol-enforce", "enforce").await;
    let user = w.user().to_string();
    let exact = uai("team-ids", "app-id");
    let probe = uai("probe-rg", "probe");
    w.wait_grants_policy_acts(&probe).await;

    // Not granted: refused with the message, nothing stored.
    let out = w.editor_apply(&identity(&user, "app-id", &exact));
    assert!(!out.success, "enforce refuses it: {}", out.stdout);
    assert_grant_message(&out.stderr, &user, &exact);
    assert!(!w.exists("azureidentity", "app-id"), "nothing stored");
    // An identity without spec.type is type 0 as well.
    let mut untyped = identity(&user, "untyped", &exact);
    untyped["spec"].as_object_mut().unwrap().remove("type");
    let out = w.editor_apply(&untyped);
    assert!(!out.success, "untyped: {}", out.stdout);
    // A service principal (type 1) carries its own credential: not subject to it.
    let sp = json!({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
        "metadata": {"name": "sp", "namespace": user},
        "spec": {"type": 1, "clientID": CLIENT, "tenantID": "t",
                 "clientPassword": {"name": "sp-secret", "namespace": user}},
    });
    let out = w.editor_apply(&sp);
    assert!(out.success, "type 1: {}", out.stderr);

    // The administrator grants the exact ID and a resource group (blanks and
    // case do not matter); the namespace informer catches up within SETTLE.
    let prefix = uai("Shared-IDs", "*").to_uppercase();
    let grant = format!("{exact} ,  {prefix}");
    let out = w.as_admin(
        &[
            "annotate",
            "namespace",
            &user,
            "--overwrite",
            &format!("{ANNOTATION_ALLOWED_IDENTITIES}={grant}"),
        ],
        None,
    );
    assert!(out.success, "{}", out.stderr);
    let applied = wait_for("granted identity admitted", SETTLE, || {
        let out = w.editor_apply(&identity(&user, "app-id", &exact));
        async move { out.success.then_some(out) }
    })
    .await
    .unwrap();
    assert!(!applied.stderr.contains("Warning"), "{}", applied.stderr);
    assert!(w.exists("azureidentity", "app-id"));
    // Prefix grant: any identity of that resource group, in any case.
    let shared = uai("shared-ids", "db-reader");
    let out = w.editor_apply(&identity(&user, "db-reader", &shared));
    assert!(out.success, "prefix grant: {}", out.stderr);
    // Still nothing else: another group, a longer name than the exact one.
    for (name, other) in [
        ("elsewhere", uai("team-ids-2", "app-id")),
        ("longer", format!("{exact}2")),
    ] {
        let out = w.editor_apply(&identity(&user, name, &other));
        assert!(!out.success, "{name} admitted");
        assert_grant_message(&out.stderr, &user, &other);
    }
    // Updating an admitted identity to an ungranted ID is refused too.
    let out = w.editor_apply(&identity(&user, "db-reader", &uai("other", "x")));
    assert!(!out.success, "update to an ungranted ID: {}", out.stdout);
}

/// The CEL grant rule answers like `identity_granted`, case by case, each in
/// a namespace created with its annotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_grant_rule_matches_the_shared_rust_rule() {
    let w = World::new("pol-table", "enforce").await;
    let cluster = w.cluster;
    w.wait_policy_acts(
        &|a, s| w.as_admin(a, s),
        &identity(w.user(), "probe", &uai("probe-rg", "probe")),
        &w.policy("identity-grants"),
    )
    .await;
    let rg = uai("rg-a", "");
    let id = format!("{rg}app");
    let cases: Vec<(Option<String>, String)> = vec![
        (None, id.clone()),
        (Some(String::new()), id.clone()),
        (Some(" , ".into()), id.clone()),
        (Some("*".into()), id.clone()),
        (Some(" * ".into()), id.clone()),
        (Some(id.clone()), id.clone()),
        (Some(format!("\t{}  ", id.to_uppercase())), id.clone()),
        (Some(format!("{rg}*")), id.clone()),
        (Some(format!("{rg}ap*")), id.clone()),
        (Some(format!("{rg}other,{rg}app")), id.clone()),
        (Some(format!("{rg}ap")), id.clone()),
        (Some(format!("{rg}app2")), id.clone()),
        (Some(format!("{rg}*pp")), id.clone()),
        (
            Some("/subscriptions/s1/resourceGroups/rg-b/*".into()),
            id.clone(),
        ),
        (Some(format!("{rg}**")), id.clone()),
        (Some("*".into()), String::new()),
        (Some("*".into()), "   ".into()),
        (Some(id.to_uppercase()), format!("  {id} ")),
    ];
    for (grant, rid) in &cases {
        let want = identity_granted(grant.as_deref(), rid);
        let ns = Ns::create(cluster, "pol-case", &w.name, grant.as_deref());
        // The bindings match this new namespace once the apiserver sees it
        // (the AzureAssignedIdentity policy refuses everyone but MIC); the
        // identity policy reads the Namespace from the same informer.
        w.wait_policy_acts(
            &|a, s| w.as_admin(a, s),
            &assigned_identity(&ns.name, "probe"),
            &w.policy("assigned-identity-writers"),
        )
        .await;
        let out = w.as_admin(
            &["create", "--dry-run=server", "-f", "-"],
            Some(&identity(&ns.name, "case", rid).to_string()),
        );
        assert_eq!(
            out.success, want,
            "grant {grant:?}, resourceID {rid:?}: admission {} but identity_granted says {want}\n{}",
            out.success, out.stderr
        );
        if !want {
            assert!(
                out.stderr
                    .contains(&format!("'{}'", w.policy("identity-grants"))),
                "{}",
                out.stderr
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assigned_identities_are_written_only_by_mic() {
    let w = World::new("pol-aai", "warn").await;
    let user = w.user().to_string();
    w.wait_policy_acts(
        &|a, s| w.as_admin(a, s),
        &assigned_identity(&user, "probe"),
        &w.policy("assigned-identity-writers"),
    )
    .await;
    // The user, even with RBAC for AzureAssignedIdentities in their namespace.
    w.grant_editor("aai-writer", "azureassignedidentities");
    let can = w.editor_can_create("azureassignedidentities.aadpodidentity.k8s.io");
    assert_eq!(
        can.stdout.trim(),
        "yes",
        "RBAC lets the user: {}",
        can.stderr
    );
    let forged = assigned_identity(&user, "forged").to_string();
    let out = w.as_editor(&["apply", "-f", "-"], Some(&forged));
    assert!(!out.success, "user's AzureAssignedIdentity admitted");
    let mic = format!("system:serviceaccount:{}:{}-mic", w.rel_ns.name, w.name);
    for want in ["written only by MIC", &mic, "may not create"] {
        assert!(
            out.stderr.contains(want),
            "{want:?} missing: {}",
            out.stderr
        );
    }
    assert!(!w.exists("azureassignedidentity", "forged"));
    // A cluster admin too.
    let out = w.as_admin(&["create", "-f", "-"], Some(&forged));
    assert!(!out.success, "admin's AzureAssignedIdentity admitted");
    // MIC's ServiceAccount, authorized by the chart's ClusterRole: admitted,
    // and its status write (an update of the main resource) too.
    let mic_kc = w
        .cluster
        .service_account_kubeconfig(&w.rel_ns.name, &format!("{}-mic", w.name))
        .await
        .unwrap();
    let as_mic =
        |args: &[&str], stdin: Option<&str>| run(w.cluster.kubectl_with(&mic_kc), args, stdin);
    let mut real = assigned_identity(&user, "real");
    real["status"] = json!({"status": "Created"});
    let out = as_mic(&["create", "-f", "-"], Some(&real.to_string()));
    assert!(out.success, "MIC's create: {}", out.stderr);
    let out = as_mic(
        &merge_patch(
            "azureassignedidentity",
            "real",
            &user,
            r#"{"status":{"status":"Assigned"}}"#,
        ),
        None,
    );
    assert!(out.success, "MIC's status write: {}", out.stderr);
    // Nobody else changes what MIC wrote.
    let out = w.as_editor(
        &merge_patch(
            "azureassignedidentity",
            "real",
            &user,
            r#"{"spec":{"nodename":"elsewhere"}}"#,
        ),
        None,
    );
    assert!(!out.success, "user's update admitted");
    assert!(out.stderr.contains("may not update"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceptions_are_written_only_with_cluster_wide_rights() {
    let w = World::new("pol-exc", "warn").await;
    let user = w.user().to_string();
    // The chart's -edit role no longer grants exceptions.
    let can = w.editor_can_create("azurepodidentityexceptions.aadpodidentity.k8s.io");
    assert_eq!(can.stdout.trim(), "no", "editor may create exceptions");
    // A namespace admin grants it in the namespace (RoleBinding): RBAC says
    // yes, the admission policy refuses.
    w.grant_editor("exc-writer", "azurepodidentityexceptions");
    let can = w.editor_can_create("azurepodidentityexceptions.aadpodidentity.k8s.io");
    assert_eq!(can.stdout.trim(), "yes", "{}", can.stderr);
    w.wait_policy_acts(
        &|a, s| w.as_editor(a, s),
        &exception(&user, "probe"),
        &w.policy("exception-writers"),
    )
    .await;
    let out = w.editor_apply(&exception(&user, "mine"));
    assert!(!out.success, "namespace editor's exception admitted");
    assert!(out.stderr.contains("may not create"), "{}", out.stderr);
    assert!(out.stderr.contains("in every namespace"), "{}", out.stderr);
    assert!(!w.exists("azurepodidentityexception", "mine"));

    // The cluster admin: admitted. The namespace editor may not delete it.
    let out = w.as_admin(
        &["apply", "-f", "-"],
        Some(&exception(&user, "by-admin").to_string()),
    );
    assert!(out.success, "admin's exception: {}", out.stderr);
    let out = w.as_editor(
        &[
            "delete",
            "azurepodidentityexception",
            "by-admin",
            "-n",
            &user,
        ],
        None,
    );
    assert!(!out.success, "editor deleted the admin's exception");
    assert!(out.stderr.contains("may not delete"), "{}", out.stderr);
    assert!(w.exists("azurepodidentityexception", "by-admin"));

    // An account that is no admin but holds the verb through a
    // ClusterRoleBinding: admitted (the check asks about every namespace).
    let writer = unique_name("pol-exc-writer");
    let objs = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": writer},
         "rules": [{"apiGroups": ["aadpodidentity.k8s.io"], "resources": ["azurepodidentityexceptions"],
                    "verbs": ["get", "create", "delete"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": writer},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": writer},
         "subjects": [{"kind": "ServiceAccount", "name": "cluster-writer", "namespace": w.rel_ns.name}]},
    ]});
    let _cleanup = Doomed {
        cluster: w.cluster,
        objects: vec![
            ("clusterrole".into(), writer.clone()),
            ("clusterrolebinding".into(), writer.clone()),
        ],
    };
    w.apply_admin(&objs);
    let kc = w
        .cluster
        .service_account_kubeconfig(&w.rel_ns.name, "cluster-writer")
        .await
        .unwrap();
    let ex = exception(&user, "by-cluster-writer").to_string();
    let created = wait_for("cluster-wide writer admitted", SETTLE, || {
        let out = run(
            w.cluster.kubectl_with(&kc),
            &["create", "-f", "-"],
            Some(&ex),
        );
        async move { out.success.then_some(()) }
    })
    .await;
    created.unwrap();
    let out = run(
        w.cluster.kubectl_with(&kc),
        &[
            "delete",
            "azurepodidentityexception",
            "by-cluster-writer",
            "-n",
            &user,
        ],
        None,
    );
    assert!(out.success, "cluster-wide delete: {}", out.stderr);
}

/// Warn mode, the chart's default: the seed manifests apply unchanged as the
/// namespace user; the identity gets the warning until its namespace is
/// granted the identity, then none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_manifests_still_apply_in_warn_mode() {
    let w = World::new("pol-seed", "warn").await;
    let user = w.user().to_string();
    const UAI_ID: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-uai/providers/Microsoft.ManagedIdentity/userAssignedIdentities/uai-kv";
    let vars = [
        ("UAIName", "uai-kv"),
        ("UAIId", UAI_ID),
        ("UAIClientId", "7c8e5e33-2b4a-4a36-8a3c-5d0b6e1f2a9d"),
        ("KVName", "kv-demo"),
    ];
    w.wait_policy_acts(
        &|a, s| w.as_admin(a, s),
        &identity(&user, "probe", UAI_ID),
        &w.policy("identity-grants"),
    )
    .await;
    for file in [
        "seed002-azureidentity.yaml",
        "seed002-azureidentitybinding.yaml",
        "seed002-pod.yaml",
    ] {
        let manifest = fill_template(&fixture(file).unwrap(), &vars);
        let out = w.as_editor(&["apply", "-n", &user, "-f", "-"], Some(&manifest));
        assert!(out.success, "{file}: {}", out.stderr);
        if file.contains("azureidentity.yaml") {
            assert_grant_message(&out.stderr, &user, UAI_ID);
        } else {
            assert!(!out.stderr.contains("Warning"), "{file}: {}", out.stderr);
        }
    }
    let seed004 = fill_template(
        &fixture("seed004-pod.yaml").unwrap(),
        &[
            ("POD_IDENTITY_NAME", "my-pod-identity"),
            ("SUBSCRIPTION_ID", "00000000-0000-0000-0000-000000000001"),
            ("IDENTITY_CLIENT_ID", "7c8e5e33-2b4a-4a36-8a3c-5d0b6e1f2a9d"),
            ("IDENTITY_RESOURCE_GROUP", "myIdentityResourceGroup"),
        ],
    );
    let out = w.as_editor(&["apply", "-n", &user, "-f", "-"], Some(&seed004));
    assert!(out.success, "seed004: {}", out.stderr);
    for (kind, name) in [
        ("azureidentity", "uai-kv"),
        ("azureidentitybinding", "uai-kv-binding"),
        ("pod", "nginx-secrets-store-inline"),
        ("pod", "demo"),
    ] {
        assert!(w.exists(kind, name), "{kind}/{name}");
    }
    // Granted: the same manifest applies without a warning.
    let out = w.as_admin(
        &[
            "annotate",
            "namespace",
            &user,
            &format!("{ANNOTATION_ALLOWED_IDENTITIES}={UAI_ID}"),
        ],
        None,
    );
    assert!(out.success, "{}", out.stderr);
    let manifest = fill_template(&fixture("seed002-azureidentity.yaml").unwrap(), &vars);
    wait_for("no warning once granted", SETTLE, || {
        let out = w.as_editor(&["apply", "-n", &user, "-f", "-"], Some(&manifest));
        async move { (out.success && !out.stderr.contains("Warning")).then_some(()) }
    })
    .await
    .unwrap();
}

/// The startup taint of the test below (not the chart's default, so that the
/// test also proves the key reaches the policy).
const TAINT_KEY: &str = "example.com/nmi-not-ready";

fn node_json(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"pool": "user"}},
        "spec": {"taints": [
            {"key": "other.example/keep", "value": "x", "effect": "NoSchedule"},
            {"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"},
            {"key": TAINT_KEY, "effect": "NoExecute"},
        ]},
    })
}

/// The keys of a node's taints, in order (admin view).
fn taint_keys(cluster: &Cluster, node: &str) -> Vec<String> {
    let out = cluster
        .kubectl_run(&["get", "node", node, "-o", "json"], None)
        .unwrap();
    assert!(out.success, "{}", out.stderr);
    let n: Value = serde_json::from_str(&out.stdout).unwrap();
    n["spec"]["taints"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|t| t["key"].as_str().unwrap().to_string())
        .collect()
}

/// nmi.startupTaint: the chart's RBAC and ValidatingAdmissionPolicy, applied
/// as rendered, let NMI's ServiceAccount (with the pod-bound token a kubelet
/// mounts, whose user extra names the pod's node) remove the startup taint
/// from its own Node and nothing else: not from another node, not with a
/// token that names no node, and no label, other taint, added taint, cordon,
/// owner reference, create or delete. An administrator is not limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nmi_may_only_remove_the_startup_taint_from_its_own_node() {
    let cluster = Cluster::shared();
    let name = unique_name("pol-taint");
    let rel_ns = Ns::create(cluster, "pol-taint-rel", &name, None);
    let docs = helm::template(
        &Render::new(&name, &rel_ns.name)
            .set("fullnameOverride", &name)
            .set("nmi.startupTaint.enabled", "true")
            .set("nmi.startupTaint.key", TAINT_KEY),
    )
    .unwrap();
    let nmi = format!("{name}-nmi");
    let policy = format!("{name}-nmi-startup-taint");
    let own = format!("{name}-own");
    let other = format!("{name}-other");
    let mut doomed = Doomed {
        cluster,
        objects: vec![("node".into(), own.clone()), ("node".into(), other.clone())],
    };
    let mut items = vec![];
    for o in helm::objects(&docs) {
        let kind = o["kind"].as_str().unwrap().to_string();
        let oname = o["metadata"]["name"].as_str().unwrap().to_string();
        let wanted = match kind.as_str() {
            "ValidatingAdmissionPolicy" | "ValidatingAdmissionPolicyBinding" => oname == policy,
            "ClusterRole" | "ClusterRoleBinding" | "ServiceAccount" => oname == nmi,
            _ => false,
        };
        if wanted {
            if kind != "ServiceAccount" {
                doomed.objects.push((kind.to_lowercase(), oname));
            }
            items.push(o);
        }
    }
    assert_eq!(items.len(), 5, "{items:?}");
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    let out = cluster
        .kubectl_run(
            &["apply", "--server-side", "-f", "-"],
            Some(&list.to_string()),
        )
        .unwrap();
    assert!(out.success, "apply: {}", out.stderr);
    for n in [&own, &other] {
        let out = cluster
            .kubectl_run(&["create", "-f", "-"], Some(&node_json(n).to_string()))
            .unwrap();
        assert!(out.success, "node {n}: {}", out.stderr);
    }
    // NMI's pod on `own`, and the token the kubelet would mount for it.
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "nmi-x7k2p", "namespace": rel_ns.name},
        "spec": {"serviceAccountName": nmi, "nodeName": own,
                 "containers": [{"name": "nmi", "image": "example.invalid/nmi"}]},
    });
    let out = cluster
        .kubectl_run(&["create", "-f", "-"], Some(&pod.to_string()))
        .unwrap();
    assert!(out.success, "pod: {}", out.stderr);
    let unbound = cluster
        .service_account_kubeconfig(&rel_ns.name, &nmi)
        .await
        .unwrap();
    let out = cluster
        .kubectl_run(
            &[
                "create",
                "token",
                &nmi,
                "-n",
                &rel_ns.name,
                "--bound-object-kind",
                "Pod",
                "--bound-object-name",
                "nmi-x7k2p",
                "--duration",
                "1h",
            ],
            None,
        )
        .unwrap();
    assert!(out.success, "{}", out.stderr);
    let bound_token = out.stdout.trim().to_string();
    let text = std::fs::read_to_string(&unbound).unwrap();
    let (head, _) = text.split_once("token: ").unwrap();
    let (_, tail) = text.split_once("\ncontexts:").unwrap();
    let bound = unbound.with_extension("bound.kubeconfig");
    std::fs::write(
        &bound,
        format!("{head}token: {bound_token}\ncontexts:{tail}"),
    )
    .unwrap();
    // The bound token names the node (what the policy relies on).
    let who = run(
        cluster.kubectl_with(&bound),
        &["auth", "whoami", "-o", "json"],
        None,
    );
    assert!(who.success, "{}", who.stderr);
    let who: Value = serde_json::from_str(&who.stdout).unwrap();
    assert_eq!(
        who["status"]["userInfo"]["extra"]["authentication.kubernetes.io/node-name"],
        json!([own]),
        "{who}"
    );
    let as_nmi = |args: &[&str]| run(cluster.kubectl_with(&bound), args, None);
    let patch = |node: &str, kind: &str, p: &Value| {
        vec![
            "patch".to_string(),
            "node".into(),
            node.to_string(),
            format!("--type={kind}"),
            "-p".into(),
            p.to_string(),
        ]
    };
    let strs = |v: &[String]| v.iter().map(String::as_str).collect::<Vec<_>>().join(" ");
    // Removing the taint, as NMI does: the live list without that key,
    // guarded by a test of the list it read (the apiserver stamps timeAdded
    // on NoExecute taints, so the list is read back, not taken from the
    // manifest).
    let remove_taint = |node: &str| {
        let out = cluster
            .kubectl_run(&["get", "node", node, "-o", "json"], None)
            .unwrap();
        assert!(out.success, "{}", out.stderr);
        let live: Value = serde_json::from_str(&out.stdout).unwrap();
        let old = live["spec"]["taints"].clone();
        let kept: Vec<Value> = old
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["key"] != TAINT_KEY)
            .cloned()
            .collect();
        patch(
            node,
            "json",
            &json!([{"op": "test", "path": "/spec/taints", "value": old},
                    {"op": "replace", "path": "/spec/taints", "value": kept}]),
        )
    };

    // The policy is loaded by the apiserver's informers within SETTLE: wait
    // until a label change by NMI is refused by it.
    let label = patch(
        &own,
        "merge",
        &json!({"metadata": {"labels": {"pool": "system"}}}),
    );
    let mut dry = label.clone();
    dry.push("--dry-run=server".into());
    wait_for("node policy acting", SETTLE, || {
        let out = as_nmi(&dry.iter().map(String::as_str).collect::<Vec<_>>());
        let acted = out.stderr.contains(&format!("'{policy}'"));
        async move { acted.then_some(()) }
    })
    .await
    .unwrap();
    let policy_types = cluster
        .kubectl_run(
            &["get", "validatingadmissionpolicy", &policy, "-o", "json"],
            None,
        )
        .unwrap();
    let policy_obj: Value = serde_json::from_str(&policy_types.stdout).unwrap();
    assert!(
        policy_obj["status"]["typeChecking"]["expressionWarnings"].is_null(),
        "type-check warnings: {}",
        policy_obj["status"]
    );

    let refused = |args: Vec<String>, why: &str| {
        let v: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = as_nmi(&v);
        assert!(!out.success, "{why}: admitted: {}", strs(&args));
        assert!(
            out.stderr.contains(&format!("'{policy}'")) || out.stderr.contains("Forbidden"),
            "{why}: {}",
            out.stderr
        );
        out.stderr
    };
    let nmi_user = format!("system:serviceaccount:{}:{nmi}", rel_ns.name);
    let e = refused(label, "a label");
    assert!(
        e.contains(&format!("'{policy}'")) && e.contains("labels"),
        "{e}"
    );
    let e = refused(remove_taint(&other), "another node");
    assert!(
        e.contains(&format!("'{policy}'")) && e.contains(&format!("bound to a pod on {own}")),
        "{e}"
    );
    let e = refused(
        patch(
            &own,
            "json",
            &json!([{"op": "remove", "path": "/spec/taints/0"}]),
        ),
        "another taint",
    );
    assert!(
        e.contains(&format!("only remove taints with key {TAINT_KEY}")),
        "{e}"
    );
    refused(
        patch(
            &own,
            "json",
            &json!([{"op": "add", "path": "/spec/taints/-",
                     "value": {"key": "evil.example/x", "effect": "NoExecute"}}]),
        ),
        "an added taint",
    );
    refused(
        patch(
            &own,
            "json",
            &json!([{"op": "replace", "path": "/spec/taints/1/value", "value": "changed"}]),
        ),
        "a changed startup taint",
    );
    let e = refused(
        patch(&own, "merge", &json!({"spec": {"unschedulable": true}})),
        "a cordon",
    );
    assert!(e.contains("spec"), "{e}");
    refused(
        patch(
            &own,
            "merge",
            &json!({"metadata": {"annotations": {"a": "b"}}}),
        ),
        "an annotation",
    );
    refused(
        patch(
            &own,
            "merge",
            &json!({"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "Pod",
                "name": "nmi-x7k2p", "uid": "00000000-0000-4000-8000-000000000001"}]}}),
        ),
        "an owner reference (garbage collection would delete the Node)",
    );
    refused(
        vec!["delete".into(), "node".into(), own.clone()],
        "a delete",
    );
    let fresh = node_json(&format!("{name}-new")).to_string();
    doomed.objects.push(("node".into(), format!("{name}-new")));
    let out = run(
        cluster.kubectl_with(&bound),
        &["create", "-f", "-"],
        Some(&fresh),
    );
    assert!(!out.success, "NMI created a Node");
    // A token that names no node (not bound to a pod): refused, even for its
    // own node.
    let out = run(
        cluster.kubectl_with(&unbound),
        &remove_taint(&own)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        None,
    );
    assert!(!out.success, "unbound token admitted");
    assert!(out.stderr.contains("names no node"), "{}", out.stderr);
    // (The apiserver's TaintNodesByCondition admission adds not-ready to a
    // new Node; no kubelet clears it here.)
    const NOT_READY: &str = "node.kubernetes.io/not-ready";
    assert_eq!(
        taint_keys(cluster, &own),
        ["other.example/keep", TAINT_KEY, TAINT_KEY, NOT_READY],
        "nothing changed so far"
    );

    // What NMI does (its own patch, `nmi::taint::removal_patch` of the live
    // taints): admitted, both taints with the key gone, the others kept.
    let out = cluster
        .kubectl_run(&["get", "node", &own, "-o", "json"], None)
        .unwrap();
    let live: k8s_openapi::api::core::v1::Node = serde_json::from_str(&out.stdout).unwrap();
    let taints = live.spec.and_then(|s| s.taints).unwrap_or_default();
    let nmi_patch = nmi::taint::removal_patch(&taints, TAINT_KEY).unwrap();
    let args = patch(&own, "json", &nmi_patch);
    let out = as_nmi(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.success, "NMI's removal as {nmi_user}: {}", out.stderr);
    assert_eq!(taint_keys(cluster, &own), ["other.example/keep", NOT_READY]);
    // A repeat is a no-op, admitted.
    let out = as_nmi(
        &patch(&own, "merge", &json!({"metadata": {}}))
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(out.success, "no-op: {}", out.stderr);
    // Not even the removal on the other node, and the administrator is not
    // bound by the policy.
    assert_eq!(
        taint_keys(cluster, &other),
        ["other.example/keep", TAINT_KEY, TAINT_KEY, NOT_READY]
    );
    let out = cluster
        .kubectl_run(
            &["label", "node", &other, "pool=system", "--overwrite"],
            None,
        )
        .unwrap();
    assert!(out.success, "admin: {}", out.stderr);
    drop(rel_ns);
}
