//! Identity entitlement, end to end: a pod gets only the identity it was
//! granted, and no namespace user can claim the cluster's identities.
//!
//! Every attack is made by a namespace-scoped user ([`World::namespace_user`]:
//! a ServiceAccount bound to the built-in `edit` ClusterRole and the chart's
//! `<fullname>-edit` in its own namespace, with ClusterRole aggregation done as
//! kube-controller-manager would) on the whole system: the chart rendered and
//! applied (RBAC, user-facing roles, admission policies of the chosen
//! `identityPolicy.mode`), mic and nmi as the rendered workloads run them, the
//! Azure emulator with one scale set carrying the kubelet identity and an
//! add-on identity from the start, and pods as network namespaces asking
//! 169.254.169.254 for tokens.
//!
//! For each attack: the target's token is never returned (the `appid` of every
//! answer is checked; an attacker's pod gets no token at all), no identity that
//! must stay leaves the scale set (sampled every 100 ms for the whole scenario),
//! and the user is told (admission message, Event, or the AzureAssignedIdentity's
//! `aadpodidentity.k8s.io/assignment-error`). Checks are collected rather than
//! stopping at the first, so one run reports every attack's outcome (lines
//! `[test] attack: ok|FAIL|seen ...` on stderr); the test fails if any failed.
//!
//! | attack | test |
//! |---|---|
//! | AzureIdentity: resourceID of an assignable identity, clientID of the kubelet identity / of another namespace's identity | `forged_client_ids_and_cluster_identities`, again in `off` in `forged_assigned_identity_and_policy_off`, in `enforce` in `enforce_cross_namespace` |
//! | AzureIdentity: the kubelet identity's resourceID with another clientID (and with its own), pod deleted | `forged_client_ids_and_cluster_identities` |
//! | the add-on identity that was on the scale set before mic, referenced then released | `forged_client_ids_and_cluster_identities` |
//! | AzurePodIdentityException by a namespace editor; a pod labelled `app`/`component: mic` in the release namespace | `exceptions_mic_labels_and_warn_mode_seeds` |
//! | an AzureAssignedIdentity written by hand (admission bypassed) | `forged_assigned_identity_and_policy_off` |
//! | `enforce`: namespace B claims namespace A's identity (AzureIdentity, bindings, pod labels) | `enforce_cross_namespace` |
//! | `warn`: the warning, and the seed manifests unchanged | `exceptions_mic_labels_and_warn_mode_seeds` |
//! | the seed manifests unchanged get their tokens through the Python SDK in `off`, `warn` and `enforce` (namespace granted) | `forged_assigned_identity_and_policy_off`, `exceptions_mic_labels_and_warn_mode_seeds`, `enforce_cross_namespace` |
//! | happy path through the real Python SDK in `off`, `warn`, `enforce` | one per mode, in the three tests above |
//! | `enforce`, federated identities (annotated `aadpodidentity.k8s.io/token-source: federated`, Entra ID trusting the attacker's ServiceAccount too): B declares an identity it is not granted, B binds A's; no token, no exchange at Entra ID, nothing else changed | `enforce_federated_identity_not_granted` |

use std::collections::BTreeSet;
use std::fmt::Display;
use std::process::Stdio;
use std::time::{Duration, Instant};

use aadpodid_api::{
    ANNOTATION_ASSIGNMENT_ERROR, ANNOTATION_TOKEN_SOURCE, AzureAssignedIdentity, AzureIdentity,
    AzureIdentityBinding,
};
use aadpodid_tests::e2e::{
    ADDON, ADDON_CLIENT, KUBELET, KUBELET_CLIENT, NsUser, Options, PodRef, RELEASE_NS, TOKEN_PATH,
    World, id_client, id_name, id_resource, node_identity_resource,
};
use aadpodid_tests::netns::IMDS_ADDRESS;
use aadpodid_tests::{fill_template, fixture, wait_for};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

/// Bound on an identity being Assigned to a pod.
const ASSIGN: Duration = Duration::from_secs(90);
/// Bound on waiting for mic's verdict on an attacker's pod (Assigned, or
/// refused with the assignment-error annotation).
const VERDICT: Duration = Duration::from_secs(30);
/// A client ID no identity has.
const NOBODY_CLIENT: &str = "c0000000-0000-4000-8000-00000000beef";

/// One scale set of two instances, the kubelet and add-on identities on it,
/// `id-0` and `id-1` bound in the chart's `apps` namespace and `id-2..id-4`
/// left for the users, the user-facing roles, nmi answering quickly when no
/// identity is assigned, and the policy `mode`.
fn options(mode: &str) -> Options {
    let mut o = Options::new(env!("CARGO_BIN_EXE_e2e-mic"), env!("CARGO_BIN_EXE_e2e-nmi"));
    o.scale_sets = 1;
    o.instances = 2;
    o.identities = 2;
    o.unbound_identities = 3;
    o.pods_per_node = 5;
    o.addon_identity = true;
    for (k, v) in [
        ("identityPolicy.mode", mode),
        ("rbac.createUserFacingClusterRoles", "true"),
        ("nmi.retryAttemptsForCreated", "2"),
        ("nmi.retryAttemptsForAssigned", "2"),
        ("nmi.findIdentityRetryIntervalInSeconds", "1"),
    ] {
        o.set.push((k.into(), v.into()));
    }
    o
}

/// [`options`] with federated identities: nmi may request tokens of the
/// pods' ServiceAccounts (the chart's `federatedTokens`, its node policy
/// on), with its own pod-bound token as the kubelet gives it.
fn federated_options(mode: &str) -> Options {
    let mut o = options(mode);
    o.pod_bound_tokens = true;
    o.set_values(&[
        ("federatedTokens.enabled", "true"),
        ("federatedTokens.nodePolicy", "true"),
    ]);
    o
}

/// The report of test `test` and its world with the admission policy in
/// `mode`.
async fn start(test: &'static str, mode: &str) -> anyhow::Result<(Report, World)> {
    let report = Report::new(test);
    Ok((report, World::start(options(mode)).await?))
}

/// Checks of one test, collected so that every attack's outcome is reported.
struct Report {
    test: &'static str,
    failures: Vec<String>,
    started: Instant,
}

impl Report {
    fn new(test: &'static str) -> Self {
        Report {
            test,
            failures: Vec::new(),
            started: Instant::now(),
        }
    }

    /// What was observed (for the before/after record).
    fn seen(&self, attack: &str, what: impl Display) {
        eprintln!(
            "[{} +{:.1}s] {attack}: seen {what}",
            self.test,
            self.started.elapsed().as_secs_f64()
        );
    }

    fn check(&mut self, attack: &str, ok: bool, what: impl Display) {
        eprintln!(
            "[{} +{:.1}s] {attack}: {} {what}",
            self.test,
            self.started.elapsed().as_secs_f64(),
            if ok { "ok  " } else { "FAIL" }
        );
        if !ok {
            self.failures.push(format!("{attack}: {what}"));
        }
    }

    /// Checks that the kubelet and add-on identities stayed on the scale set
    /// (`missing`: what `World::while_watching_vmss` saw leave).
    fn check_node_identities_kept(&mut self, attack: &str, missing: &[String]) {
        self.check_kept(attack, "the kubelet and add-on identities", missing);
    }

    /// Checks that the identities `which` names stayed on the scale set
    /// (`missing`: what `World::while_watching_vmss` saw leave).
    fn check_kept(&mut self, attack: &str, which: &str, missing: &[String]) {
        self.check(
            attack,
            missing.is_empty(),
            format!("{which} never left the scale set: {missing:?}"),
        );
    }

    /// Ends the test: an error listing every failed check, with the world's
    /// state when there is one.
    async fn finish(self, world: &World) -> anyhow::Result<()> {
        if self.failures.is_empty() {
            return Ok(());
        }
        anyhow::bail!(
            "{} check(s) failed:\n  {}\n{}",
            self.failures.len(),
            self.failures.join("\n  "),
            world.dump().await
        )
    }
}

/// One answer to a token request.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Answer {
    query: String,
    code: u16,
    /// The verified `appid` of a 200's token (or why there is none).
    appid: Option<String>,
    body: String,
}

impl Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let q = if self.query.is_empty() {
            "(no id)"
        } else {
            &self.query
        };
        match &self.appid {
            Some(a) => write!(f, "{q} -> {} token appid={a}", self.code),
            None => {
                let body: String = self.body.chars().take(160).collect();
                write!(f, "{q} -> {} {}", self.code, body.replace('\n', " "))
            }
        }
    }
}

/// Asks for a token from `pod` with each query (all at once, as curl from
/// inside the pod), `rounds` times one second apart; the distinct answers.
async fn ask(
    world: &World,
    pod: &PodRef,
    queries: &[String],
    rounds: usize,
) -> anyhow::Result<Vec<Answer>> {
    let mut seen = BTreeSet::new();
    for r in 0..rounds {
        if r > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let mut set = tokio::task::JoinSet::new();
        for q in queries {
            let mut cmd = world.pod_ns(pod)?.command("curl");
            cmd.args(["-s", "--max-time", "15", "-H", "Metadata: true"])
                .args(["-w", "\n%{http_code}"])
                .arg(format!("http://{IMDS_ADDRESS}{TOKEN_PATH}{q}"))
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            let q = q.clone();
            set.spawn(async move {
                let out = tokio::process::Command::from(cmd)
                    .kill_on_drop(true)
                    .output()
                    .await;
                (q, out)
            });
        }
        while let Some(joined) = set.join_next().await {
            let (query, out) = joined?;
            let text = String::from_utf8_lossy(&out?.stdout).into_owned();
            let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
            let code: u16 = code.trim().parse().unwrap_or(0);
            let appid = (code == 200).then(|| {
                world
                    .appid_of(body)
                    .unwrap_or_else(|e| format!("(unverifiable: {e})"))
            });
            seen.insert(Answer {
                query,
                code,
                appid,
                body: if code == 200 {
                    String::new()
                } else {
                    body.to_string()
                },
            });
        }
    }
    Ok(seen.into_iter().collect())
}

/// The queries an attacker's pod tries: no identity, and each target by
/// client ID and by resource ID.
fn queries(targets: &[(&str, &str)]) -> Vec<String> {
    let mut q = vec![String::new()];
    for (client, resource) in targets {
        q.push(format!("&client_id={client}"));
        q.push(format!("&msi_res_id={resource}"));
    }
    q
}

/// Checks that none of `answers` carries a token (an attacker's pod has no
/// identity it may use), naming any target whose token came back.
fn no_token(report: &mut Report, attack: &str, pod: &PodRef, answers: &[Answer]) {
    for a in answers {
        report.seen(attack, format!("{}/{}: {a}", pod.namespace, pod.name));
    }
    let tokens: Vec<String> = answers
        .iter()
        .filter(|a| a.code == 200)
        .map(|a| {
            let who = match a.appid.as_deref() {
                Some(KUBELET_CLIENT) => "the KUBELET identity",
                Some(ADDON_CLIENT) => "the ADD-ON identity",
                _ => "an identity",
            };
            format!("{who} ({a})")
        })
        .collect();
    report.check(
        attack,
        tokens.is_empty(),
        format!(
            "{}/{} gets no token: {}",
            pod.namespace,
            pod.name,
            if tokens.is_empty() {
                "none returned".to_string()
            } else {
                tokens.join("; ")
            }
        ),
    );
}

/// The AzureAssignedIdentities of a pod, one line each: name, status and the
/// assignment-error annotation.
async fn aai_lines(world: &World, pod: &PodRef) -> anyhow::Result<Vec<String>> {
    Ok(world
        .assigned_to(&pod.namespace, &pod.name)
        .await?
        .iter()
        .map(|a| {
            format!(
                "AAI {}/{} status={:?} {}={:?}",
                a.metadata.namespace.clone().unwrap_or_default(),
                a.metadata.name.clone().unwrap_or_default(),
                a.status
                    .as_ref()
                    .map(|s| s.status.clone())
                    .unwrap_or_default(),
                ANNOTATION_ASSIGNMENT_ERROR,
                assignment_error(a).unwrap_or_default()
            )
        })
        .collect())
}

fn assignment_error(a: &AzureAssignedIdentity) -> Option<String> {
    a.metadata
        .annotations
        .as_ref()
        .and_then(|m| m.get(ANNOTATION_ASSIGNMENT_ERROR))
        .cloned()
}

/// Waits (at most `VERDICT` in all) until mic decided on each pod: one of
/// its AzureAssignedIdentities is Assigned or carries the assignment-error
/// annotation. Pods still undecided are reported as seen, not failed (mic may
/// refuse without creating anything).
async fn wait_verdicts(report: &Report, world: &World, attack: &str, pods: &[&PodRef]) {
    let decided = |a: &AzureAssignedIdentity| {
        assignment_error(a).is_some() || a.status.as_ref().is_some_and(|s| s.status == "Assigned")
    };
    let deadline = Instant::now() + VERDICT;
    for p in pods {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = wait_for("mic's verdict", left, || async {
            let aais = world.assigned_to(&p.namespace, &p.name).await.ok()?;
            aais.iter().any(decided).then_some(())
        })
        .await;
        if r.is_err() {
            report.seen(
                attack,
                format!(
                    "{}/{}: no AAI Assigned or refused within {VERDICT:?}",
                    p.namespace, p.name
                ),
            );
        }
    }
}

/// Reports what the user and the administrator were told about `pods` and
/// `identities`, and checks that the user was told something: an Event in
/// their namespace (listed with their own client) naming one of
/// `identities` or `pods`, or the assignment-error annotation on one of the
/// pods' AzureAssignedIdentities.
async fn check_told(
    report: &mut Report,
    world: &World,
    attack: &str,
    user: &NsUser,
    identities: &[&str],
    pods: &[&PodRef],
) -> anyhow::Result<()> {
    let events = world
        .events_in(&user.client().await?, &user.namespace)
        .await
        .unwrap_or_else(|e| vec![format!("(the user cannot list Events: {e})")]);
    let names: Vec<&str> = identities
        .iter()
        .copied()
        .chain(pods.iter().map(|p| p.name.as_str()))
        .collect();
    let mut told: Vec<String> = events
        .iter()
        .filter(|e| names.iter().any(|n| e.contains(&format!("/{n} "))))
        .map(|e| format!("Event {e}"))
        .collect();
    for p in pods {
        for a in world.assigned_to(&p.namespace, &p.name).await? {
            let line = aai_lines(world, p).await?.join("; ");
            report.seen(attack, line);
            if let Some(err) = assignment_error(&a) {
                told.push(format!("{ANNOTATION_ASSIGNMENT_ERROR}: {err}"));
            }
        }
    }
    for t in &told {
        report.seen(attack, t);
    }
    report.check(
        attack,
        !told.is_empty(),
        format!(
            "the user is told why (Event on {identities:?} or assignment-error on the pods' AAIs); Events in {}: {}",
            user.namespace,
            events.len()
        ),
    );
    Ok(())
}

/// Applies `yaml` with kubectl as `user` in their namespace; reports what
/// kubectl printed and returns (success, stdout + stderr).
async fn apply_as(
    report: &Report,
    world: &World,
    attack: &str,
    user: &NsUser,
    yaml: &str,
) -> anyhow::Result<(bool, String)> {
    let out = world
        .kubectl_as(
            Some(user),
            &["apply", "-n", &user.namespace, "-f", "-"],
            Some(yaml),
        )
        .await?;
    let text = format!("{}{}", out.stdout, out.stderr);
    report.seen(
        attack,
        format!(
            "kubectl apply as {} -> {}: {}",
            user.username(),
            if out.success { "applied" } else { "REFUSED" },
            text.trim().replace('\n', " | ")
        ),
    );
    Ok((out.success, text))
}

fn identity_yaml(name: &str, resource: &str, client: &str) -> String {
    format!(
        "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\nmetadata:\n  name: {name}\nspec:\n  type: 0\n  resourceID: {resource}\n  clientID: {client}\n"
    )
}

/// A federated AzureIdentity (annotated `aadpodidentity.k8s.io/token-source:
/// federated`) whose tokens nmi exchanges at `ad_endpoint`.
fn federated_identity_yaml(name: &str, resource: &str, client: &str, ad_endpoint: &str) -> String {
    format!(
        "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\nmetadata:\n  name: {name}\n  annotations:\n    {ANNOTATION_TOKEN_SOURCE}: federated\nspec:\n  type: 0\n  resourceID: {resource}\n  clientID: {client}\n  adEndpoint: {ad_endpoint}\n"
    )
}

/// The namespace's `default` ServiceAccount (nothing in the test cluster
/// creates it), which the pods run as.
const DEFAULT_SERVICE_ACCOUNT: &str =
    "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: default\n";

fn binding_yaml(name: &str, identity: &str, selector: &str) -> String {
    format!(
        "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentityBinding\nmetadata:\n  name: {name}\nspec:\n  azureIdentity: {identity}\n  selector: {selector}\n"
    )
}

/// An AzureIdentity and its binding (selector = the identity's name).
fn declare(name: &str, resource: &str, client: &str) -> String {
    format!(
        "{}---\n{}",
        identity_yaml(name, resource, client),
        binding_yaml(&format!("{name}-binding"), name, name)
    )
}

/// One namespace's user acting in the world with their own credentials.
struct Acting<'a> {
    world: &'a World,
    user: &'a NsUser,
    client: &'a kube::Client,
}

impl<'a> Acting<'a> {
    fn new(world: &'a World, user: &'a NsUser, client: &'a kube::Client) -> Self {
        Acting {
            world,
            user,
            client,
        }
    }

    /// Pod `name` in the user's namespace on placement `i`, labelled
    /// `aadpodidbinding: selector`.
    async fn bound(&self, name: &str, selector: &str, i: usize) -> anyhow::Result<PodRef> {
        let labels = [("aadpodidbinding", selector)];
        self.world
            .create_pod_as(self.client, &self.user.namespace, name, &labels, i)
            .await
    }

    /// Pod `name` applied by the user in their namespace, running as its
    /// `default` ServiceAccount (named, as a federated token is bound to the
    /// pod's ServiceAccount) on placement `i`, labelled `aadpodidbinding:
    /// selector`.
    async fn running_as_default(
        &self,
        name: &str,
        selector: &str,
        i: usize,
    ) -> anyhow::Result<PodRef> {
        let pod = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels:\n    aadpodidbinding: {selector}\nspec:\n  serviceAccountName: default\n  containers:\n  - name: app\n    image: app\n"
        );
        let out = self
            .world
            .kubectl_as(
                Some(self.user),
                &["apply", "-n", &self.user.namespace, "-f", "-"],
                Some(&pod),
            )
            .await?;
        anyhow::ensure!(out.success, "apply pod {name}: {}", out.stderr);
        self.world.run_pod(&self.user.namespace, name, i).await
    }

    /// [`apply_as`] this user.
    async fn apply(
        &self,
        report: &Report,
        attack: &str,
        yaml: &str,
    ) -> anyhow::Result<(bool, String)> {
        apply_as(report, self.world, attack, self.user, yaml).await
    }

    /// [`apply_as`] this user, checking that it applies without warning.
    async fn apply_cleanly(
        &self,
        report: &mut Report,
        attack: &str,
        yaml: &str,
    ) -> anyhow::Result<()> {
        let (ok, text) = self.apply(report, attack, yaml).await?;
        report.check(
            attack,
            ok && !text.contains("Warning"),
            format!("applies without warning: {}", text.trim()),
        );
        Ok(())
    }

    /// [`check_told`] this user.
    async fn check_told(
        &self,
        report: &mut Report,
        attack: &str,
        identities: &[&str],
        pods: &[&PodRef],
    ) -> anyhow::Result<()> {
        check_told(report, self.world, attack, self.user, identities, pods).await
    }
}

/// Namespace `team-a`, granted `id-2`, and namespace `team-b`, granted
/// `id-3`: their users and the users' clients.
struct Teams {
    a: NsUser,
    b: NsUser,
    a_client: kube::Client,
    b_client: kube::Client,
}

impl Teams {
    async fn new(world: &World) -> anyhow::Result<Self> {
        let a = world
            .namespace_user("team-a", Some(&id_resource(&id_name(2))))
            .await?;
        let b = world
            .namespace_user("team-b", Some(&id_resource(&id_name(3))))
            .await?;
        Ok(Teams {
            a_client: a.client().await?,
            b_client: b.client().await?,
            a,
            b,
        })
    }

    /// Each team's user acting in `world`.
    fn acting<'a>(&'a self, world: &'a World) -> (Acting<'a>, Acting<'a>) {
        (
            Acting::new(world, &self.a, &self.a_client),
            Acting::new(world, &self.b, &self.b_client),
        )
    }
}

/// Every object of kind `K` in `namespace` (all namespaces for `None`), as
/// `namespace/name@resourceVersion`: equal lists, unchanged objects.
async fn versions<K>(world: &World, namespace: Option<&str>) -> anyhow::Result<Vec<String>>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let client = world.client().await?;
    let api: Api<K> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|o| {
            let m = o.meta();
            format!(
                "{}/{}@{}",
                m.namespace.as_deref().unwrap_or_default(),
                m.name.as_deref().unwrap_or_default(),
                m.resource_version.as_deref().unwrap_or_default()
            )
        })
        .collect())
}

/// Waits (bounded by `ASSIGN`) until one of the pod's AzureAssignedIdentities
/// is Assigned.
async fn wait_pod_assigned(world: &World, pod: &PodRef) -> anyhow::Result<()> {
    let r = wait_for("the pod's identity Assigned", ASSIGN, || async {
        let aais = world.assigned_to(&pod.namespace, &pod.name).await.ok()?;
        aais.iter()
            .any(|a| a.status.as_ref().is_some_and(|s| s.status == "Assigned"))
            .then_some(())
    })
    .await;
    match r {
        Ok(()) => Ok(()),
        Err(e) => Err(e.context(format!(
            "{}/{}: {:?}\n{}",
            pod.namespace,
            pod.name,
            aai_lines(world, pod).await,
            world.dump().await
        ))),
    }
}

/// The happy path: the pod's token through the real Python SDK (by client
/// ID, as the seeds' apps ask) carries the identity's client ID.
async fn check_python_token(
    report: &mut Report,
    world: &World,
    what: &str,
    pod: &PodRef,
    client: &str,
) {
    let started = Instant::now();
    let got = world.python_token_appid(pod, Some(client)).await;
    let ok = got.as_ref().is_ok_and(|a| a.eq_ignore_ascii_case(client));
    report.check(
        what,
        ok,
        format!(
            "{}/{} gets its token through the Python SDK (client_id={client}): {} in {:.1?}",
            pod.namespace,
            pod.name,
            match &got {
                Ok(a) => format!("appid={a}"),
                Err(e) => format!("{e:#}"),
            },
            started.elapsed()
        ),
    );
}

/// The user's seed manifests, unchanged, applied by `user` in its namespace:
/// seed 002 (identity `id-2`, binding, pod) and seed 004 (the two objects
/// `az aks pod-identity add` creates for `id-3`, and its pod), the pods run on
/// the world's pod `slots`; each gets its identity's token through the real
/// Python SDK.
async fn seeds_get_tokens(
    report: &mut Report,
    world: &World,
    attack: &str,
    user: &NsUser,
    slots: (usize, usize),
) -> anyhow::Result<()> {
    let (id2, id2_res, id2_client) = (id_name(2), id_resource(&id_name(2)), id_client(2));
    let vars2 = [
        ("UAIName", id2.as_str()),
        ("UAIId", id2_res.as_str()),
        ("UAIClientId", id2_client.as_str()),
        ("KVName", "kv-demo"),
    ];
    for file in [
        "seed002-azureidentity.yaml",
        "seed002-azureidentitybinding.yaml",
        "seed002-pod.yaml",
    ] {
        let (ok, text) = apply_as(
            report,
            world,
            attack,
            user,
            &fill_template(&fixture(file)?, &vars2),
        )
        .await?;
        report.check(attack, ok, format!("{file} applies: {}", text.trim()));
    }
    // What `az aks pod-identity add --name my-pod-identity` creates.
    let (id3_res, id3_client) = (id_resource(&id_name(3)), id_client(3));
    let addon = format!(
        "{}---\n{}",
        identity_yaml("my-pod-identity", &id3_res, &id3_client),
        binding_yaml(
            "my-pod-identity-binding",
            "my-pod-identity",
            "my-pod-identity"
        )
    );
    let (ok, text) = apply_as(report, world, attack, user, &addon).await?;
    report.check(
        attack,
        ok,
        format!("seed 004's identity objects apply: {}", text.trim()),
    );
    let vars4 = [
        ("POD_IDENTITY_NAME", "my-pod-identity"),
        ("SUBSCRIPTION_ID", aadpodid_tests::e2e::SUB),
        ("IDENTITY_CLIENT_ID", id3_client.as_str()),
        ("IDENTITY_RESOURCE_GROUP", aadpodid_tests::e2e::APP_RG),
    ];
    let (ok, text) = apply_as(
        report,
        world,
        attack,
        user,
        &fill_template(&fixture("seed004-pod.yaml")?, &vars4),
    )
    .await?;
    report.check(
        attack,
        ok,
        format!("seed004-pod.yaml applies: {}", text.trim()),
    );
    let seed2 = world
        .run_pod(&user.namespace, "nginx-secrets-store-inline", slots.0)
        .await?;
    let seed4 = world.run_pod(&user.namespace, "demo", slots.1).await?;
    wait_pod_assigned(world, &seed2).await?;
    wait_pod_assigned(world, &seed4).await?;
    check_python_token(report, world, attack, &seed2, &id2_client).await;
    check_python_token(report, world, attack, &seed4, &id3_client).await;
    Ok(())
}

/// Waits (bounded) until the pods' AzureAssignedIdentities are gone, then a
/// few scale-set writes' worth, so any removal mic would make has landed.
async fn wait_released(world: &World, pods: &[&PodRef]) -> anyhow::Result<()> {
    wait_for("the pods' AzureAssignedIdentities gone", ASSIGN, || async {
        for p in pods {
            if !world
                .assigned_to(&p.namespace, &p.name)
                .await
                .ok()?
                .is_empty()
            {
                return None;
            }
        }
        Some(())
    })
    .await?;
    // A scale-set write takes 45 virtual s = 1.5 s at the world's clock speed.
    tokio::time::sleep(Duration::from_secs(6)).await;
    Ok(())
}

/// Attacks 1-3 in the chart's default mode (`warn`), by a user whose
/// namespace the policy trusts with every identity (`*`), so only the
/// identity checks of mic and nmi stand between them and the cluster's
/// identities:
/// - `forged-kubelet`: resourceID of `id-2` (assignable), clientID of the
///   kubelet identity;
/// - `forged-other`: resourceID of `id-2`, clientID of `id-1`, which
///   namespace `apps` uses (its pod runs on the same scale set);
/// - `kubelet-res`: the kubelet identity's resourceID with another clientID,
///   and `kubelet-own` with its own clientID; the pods are then deleted;
/// - `addon`: the add-on identity that was on the scale set before mic,
///   with its own clientID; the pod is then deleted.
///
/// The kubelet and add-on identities (and `id-1` while its pod runs) never
/// leave the scale set; `apps`' pod keeps getting `id-1`'s token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_client_ids_and_cluster_identities() -> anyhow::Result<()> {
    let (mut report, world) = start("forged_client_ids_and_cluster_identities", "warn").await?;
    let kubelet_res = node_identity_resource(KUBELET);
    let addon_res = node_identity_resource(ADDON);
    let (id1_res, id1_client) = (id_resource(&id_name(1)), id_client(1));
    let victim = world.create_pods(0, 1, |_| Some(1)).await?;
    world.wait_assigned(&victim, ASSIGN).await?;
    world.check_tokens(&victim).await?;
    let user = world.namespace_user("attacker", Some("*")).await?;
    let client = user.client().await?;
    let as_user = Acting::new(&world, &user, &client);

    let scenario = async {
        let attacks: Vec<(&str, String, &str, &str)> = vec![
            (
                "forged-kubelet",
                id_resource(&id_name(2)),
                KUBELET_CLIENT,
                "1: forged clientID (kubelet)",
            ),
            (
                "forged-other",
                id_resource(&id_name(2)),
                &id1_client,
                "1: forged clientID (other namespace's id-1)",
            ),
            (
                "kubelet-res",
                kubelet_res.clone(),
                NOBODY_CLIENT,
                "2: kubelet resourceID, other clientID",
            ),
            (
                "kubelet-own",
                kubelet_res.clone(),
                KUBELET_CLIENT,
                "2: kubelet resourceID and clientID",
            ),
            (
                "addon",
                addon_res.clone(),
                ADDON_CLIENT,
                "3: pre-existing add-on identity",
            ),
        ];
        let mut pods = Vec::new();
        for (k, (name, resource, client_id, attack)) in attacks.iter().enumerate() {
            as_user
                .apply(&report, attack, &declare(name, resource, client_id))
                .await?;
            let pod = as_user.bound(&format!("pod-{name}"), name, k + 1).await?;
            pods.push(pod);
        }
        let refs: Vec<&PodRef> = pods.iter().collect();
        wait_verdicts(&report, &world, "1-3", &refs).await;
        let kubelet = (KUBELET_CLIENT, kubelet_res.as_str());
        let addon = (ADDON_CLIENT, addon_res.as_str());
        let id1 = (id1_client.as_str(), id1_res.as_str());
        for ((name, _, _, attack), pod) in attacks.iter().zip(&pods) {
            let answers = ask(&world, pod, &queries(&[kubelet, addon, id1]), 2).await?;
            no_token(&mut report, attack, pod, &answers);
            as_user
                .check_told(&mut report, attack, &[name], &[pod])
                .await?;
        }
        // The bystander keeps its identity.
        let victim_ok = world.check_tokens(&victim).await;
        report.check(
            "1",
            victim_ok.is_ok(),
            format!(
                "apps/{} still gets id-1's token: {victim_ok:?}",
                victim[0].name
            ),
        );
        // Released one at a time, so each removal mic would make is its own.
        for (stage, keep, attack) in [
            (&pods[3..4], KUBELET, attacks[3].3),
            (&pods[2..3], KUBELET, attacks[2].3),
            (&pods[4..5], ADDON, attacks[4].3),
            (&pods[0..2], KUBELET, attacks[0].3),
        ] {
            world.delete_pods(stage).await?;
            wait_released(&world, &stage.iter().collect::<Vec<_>>()).await?;
            let now = world.all_vmss_identities();
            let kept = now.values().all(|ids| ids.contains(&keep.to_lowercase()));
            report.check(
                attack,
                kept,
                format!(
                    "{keep} still on the scale set after {} was deleted and released: {now:?}",
                    stage[0].name
                ),
            );
        }
        anyhow::Ok(())
    };
    let (result, missing) = world
        .while_watching_vmss(&[KUBELET, ADDON, &id_name(1)], scenario)
        .await;
    result?;
    let after = world.all_vmss_identities();
    report.seen("2/3", format!("the scale sets' identities now: {after:?}"));
    report.check_kept(
        "2/3",
        "the kubelet identity, the add-on identity and id-1",
        &missing,
    );
    report.finish(&world).await
}

/// Attack 4 and the `warn` mode's promise:
/// - an AzurePodIdentityException created by a namespace editor is refused
///   (if it were not, a pod it excepts asks for the kubelet identity);
/// - a pod labelled `app: mic`, `component: mic` (and
///   `app.kubernetes.io/component: mic`) in the release namespace, created
///   by an administrator (pod-create there is what an attacker would need),
///   gets no node-level token;
/// - `warn`: `kubectl apply` of an AzureIdentity whose identity is not
///   granted to the namespace prints a warning and applies; the seed
///   manifests (`seed002-*`, and seed 004's `az aks pod-identity add`
///   objects and pod), filled in as their authors' tools do, apply unchanged
///   and their pods get tokens through the real Python SDK.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exceptions_mic_labels_and_warn_mode_seeds() -> anyhow::Result<()> {
    let (mut report, world) = start("exceptions_mic_labels_and_warn_mode_seeds", "warn").await?;
    let kubelet_res = node_identity_resource(KUBELET);
    let addon_res = node_identity_resource(ADDON);
    let targets = queries(&[(KUBELET_CLIENT, &kubelet_res), (ADDON_CLIENT, &addon_res)]);
    let user = world.namespace_user("tenant", None).await?;
    let client = user.client().await?;
    let as_user = Acting::new(&world, &user, &client);

    let scenario = async {
        // 4a: an exception by the namespace editor.
        let attack = "4: exception by a namespace editor";
        let exception = "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzurePodIdentityException\nmetadata:\n  name: escape\nspec:\n  podLabels:\n    escape: \"yes\"\n";
        let (applied, text) = as_user.apply(&report, attack, exception).await?;
        report.check(
            attack,
            !applied && !text.trim().is_empty(),
            format!("refused with a message: {}", text.trim()),
        );
        if applied {
            let pod = world
                .create_pod_as(&client, &user.namespace, "escaped", &[("escape", "yes")], 0)
                .await?;
            let answers = ask(&world, &pod, &targets, 1).await?;
            no_token(&mut report, attack, &pod, &answers);
        }

        // 4b: a pod with mic's labels in the release namespace.
        let attack = "4: pod labelled as mic in the release namespace";
        let admin = world.client().await?;
        let fake = world
            .create_pod_as(
                &admin,
                RELEASE_NS,
                "not-mic",
                &[
                    ("app", "mic"),
                    ("component", "mic"),
                    ("app.kubernetes.io/component", "mic"),
                ],
                1,
            )
            .await?;
        let answers = ask(&world, &fake, &targets, 2).await?;
        no_token(&mut report, attack, &fake, &answers);

        // Warn: an identity not granted to the namespace.
        let attack = "6 warn: ungranted identity";
        let (applied, text) = as_user
            .apply(
                &report,
                attack,
                &identity_yaml("ungranted", &id_resource(&id_name(4)), &id_client(4)),
            )
            .await?;
        report.check(
            attack,
            applied && text.contains("Warning"),
            format!("applied with a warning: {}", text.trim()),
        );

        // Warn: the seed manifests, unchanged.
        seeds_get_tokens(&mut report, &world, "7 warn: seed manifests", &user, (2, 3)).await?;
        anyhow::Ok(())
    };
    let (result, missing) = world.while_watching_vmss(&[KUBELET, ADDON], scenario).await;
    result?;
    report.check_node_identities_kept("4", &missing);
    report.finish(&world).await
}

/// Attack 6 under `enforce`: namespace `team-a` is granted `id-2` and uses
/// it (its pod gets the token through the real Python SDK); namespace
/// `team-b`, granted `id-3` only, tries to get `id-2`'s token:
/// - an AzureIdentity with `id-2`'s resourceID and clientID: refused at admission;
/// - a binding naming `team-a`'s AzureIdentity and selecting `team-a`'s
///   label, and a pod in `team-b` with that label;
/// - a binding naming `team-a`'s AzureIdentity with its own selector, and a pod;
/// - an AzureIdentity with its granted `id-3`'s resourceID and `id-2`'s
///   clientID (passes admission), binding and pod;
/// - an AzureAssignedIdentity written by the administrator (refused at
///   admission: only mic's ServiceAccount may) and by the user (RBAC).
///
/// No `team-b` pod gets any token; `team-a`'s pod still gets its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enforce_cross_namespace() -> anyhow::Result<()> {
    let (mut report, world) = start("enforce_cross_namespace", "enforce").await?;
    let (id2, id2_res, id2_client) = (id_name(2), id_resource(&id_name(2)), id_client(2));
    let id3_res = id_resource(&id_name(3));
    let kubelet_res = node_identity_resource(KUBELET);
    let teams = Teams::new(&world).await?;
    let (as_a, as_b) = teams.acting(&world);
    let (b, b_client) = (&teams.b, &teams.b_client);
    // The seed manifests, unchanged, in a namespace granted their identities.
    let seeds_grant = format!("{id2_res}, {id3_res}");
    let seeds = world.namespace_user("seeds", Some(&seeds_grant)).await?;

    let scenario = async {
        seeds_get_tokens(
            &mut report,
            &world,
            "7 enforce: seed manifests",
            &seeds,
            (4, 5),
        )
        .await?;
        let attack = "7 enforce: granted identity";
        as_a.apply_cleanly(&mut report, attack, &declare("a-id", &id2_res, &id2_client))
            .await?;
        let a_pod = as_a.bound("a-app", "a-id", 0).await?;
        wait_pod_assigned(&world, &a_pod).await?;
        check_python_token(&mut report, &world, attack, &a_pod, &id2_client).await;

        let attack = "6 enforce: B declares A's identity";
        let (applied, text) = as_b
            .apply(
                &report,
                attack,
                &identity_yaml("b-steal", &id2_res, &id2_client),
            )
            .await?;
        report.check(
            attack,
            !applied && !text.trim().is_empty(),
            format!("refused at admission with a message: {}", text.trim()),
        );

        let attack = "6 enforce: B binds A's identity";
        let cross = format!(
            "{}---\n{}",
            binding_yaml("b-cross", "a-id", "a-id"),
            binding_yaml("b-cross-own", "a-id", "b-own")
        );
        as_b.apply(&report, attack, &cross).await?;
        let attack_forged = "6/1 enforce: B's granted resourceID with A's clientID";
        as_b.apply(
            &report,
            attack_forged,
            &declare("b-forged", &id3_res, &id2_client),
        )
        .await?;
        let b_pods = [
            as_b.bound("b-with-a-label", "a-id", 1).await?,
            as_b.bound("b-own", "b-own", 2).await?,
            as_b.bound("b-forged", "b-forged", 3).await?,
        ];
        let refs: Vec<&PodRef> = b_pods.iter().collect();
        // b-own's binding names an identity its namespace does not have: no
        // AzureAssignedIdentity is made for it, so there is no verdict to wait for.
        wait_verdicts(&report, &world, attack, &[&b_pods[0], &b_pods[2]]).await;
        let q = queries(&[(&id2_client, &id2_res), (KUBELET_CLIENT, &kubelet_res)]);
        for (p, what) in b_pods.iter().zip([attack, attack, attack_forged]) {
            let answers = ask(&world, p, &q, 2).await?;
            no_token(&mut report, what, p, &answers);
        }
        for line in world
            .events_in(b_client, &b.namespace)
            .await
            .unwrap_or_default()
        {
            report.seen(attack, format!("Event in team-b: {line}"));
        }
        as_b.check_told(&mut report, attack_forged, &["b-forged"], &[&b_pods[2]])
            .await?;
        for p in &b_pods[..2] {
            for l in aai_lines(&world, p).await? {
                report.seen(attack, format!("{}: {l}", p.name));
            }
        }
        let again = world.python_token_appid(&a_pod, Some(&id2_client)).await;
        report.check(
            "6 enforce",
            again
                .as_ref()
                .is_ok_and(|x| x.eq_ignore_ascii_case(&id2_client)),
            format!("team-a's pod still gets {id2}'s token: {again:?}"),
        );
        // AzureAssignedIdentities written by anyone but mic: refused at
        // admission for the administrator, by RBAC for the user.
        let attack = "5 enforce: AAI written outside mic";
        let handmade = |ns: &str| -> anyhow::Result<AzureAssignedIdentity> {
            let node = world.nodes[b_pods[1].node].name.clone();
            Ok(serde_json::from_value(json!({
                "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureAssignedIdentity",
                "metadata": {"name": "handmade", "namespace": ns, "labels": {"nodename": node}},
                "spec": {
                    "azureIdentityRef": {"metadata": {"name": "a-id", "namespace": "team-a"},
                        "spec": {"type": 0, "resourceID": id2_res, "clientID": id2_client}},
                    "azureBindingRef": {"metadata": {"name": "b-cross-own", "namespace": "team-b"},
                        "spec": {"azureIdentity": "a-id", "selector": "b-own"}},
                    "pod": "b-own", "podNamespace": "team-b", "nodename": node,
                },
                "status": {"status": "Assigned", "availableReplicas": 1},
            }))?)
        };
        for (who, client, ns) in [
            ("the administrator", world.client().await?, "default"),
            ("the user", b_client.clone(), "team-b"),
        ] {
            let api: Api<AzureAssignedIdentity> = Api::namespaced(client, ns);
            let r = api.create(&PostParams::default(), &handmade(ns)?).await;
            if r.is_ok() {
                let _ = Api::<AzureAssignedIdentity>::namespaced(world.client().await?, ns)
                    .delete("handmade", &DeleteParams::default())
                    .await;
            }
            report.check(
                attack,
                r.is_err(),
                format!(
                    "{who}'s write in {ns} is refused: {}",
                    r.map_or_else(|e| e.to_string(), |_| "ADMITTED".to_string())
                ),
            );
        }

        world.delete_pods(&b_pods).await?;
        wait_released(&world, &refs).await?;
        anyhow::Ok(())
    };
    let (result, missing) = world
        .while_watching_vmss(&[KUBELET, ADDON, &id2], scenario)
        .await;
    result?;
    report.check_kept("6", "the kubelet, add-on and team-a's identities", &missing);
    report.finish(&world).await
}

/// Attack 8, federated identities under `enforce`. Namespace `team-a` is
/// granted `id-2` and uses it as a federated identity (annotated
/// `aadpodidentity.k8s.io/token-source: federated`; Entra ID trusts
/// `team-a`'s `default` ServiceAccount for it): its pod gets `id-2`'s token.
/// Namespace `team-b` is granted `id-3` only, and Entra ID would issue
/// `id-2`'s token for `team-b`'s `default` ServiceAccount too (a federated
/// credential as an administrator might have made it), so that only the
/// identity policy, mic and nmi stand between `team-b` and `id-2`. Its user:
/// - declares a federated AzureIdentity naming `id-2`, its binding and a
///   pod: the AzureIdentity is refused at admission with the reason;
/// - labels a pod with `team-a`'s selector (upstream's default mode lets
///   `team-a`'s binding select pods of every namespace): mic assigns nothing
///   (`id-2` is not granted where the pod runs) and says so in an Event on
///   `team-a`'s AzureIdentity;
/// - binds `team-a`'s federated AzureIdentity by name with a selector of its
///   own, and a pod (a binding names an identity of its own namespace only).
///
/// Every pod runs as `team-b`'s `default` ServiceAccount. None gets a token:
/// every query is answered 404 with nmi's answer for a pod without an
/// assigned identity. Meanwhile Entra ID sees no token request for `id-2`,
/// ARM no write and IMDS no token request; the AzureAssignedIdentities, the
/// scale set's identities and `team-a`'s objects stay as they were;
/// `team-a`'s pod still gets its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enforce_federated_identity_not_granted() -> anyhow::Result<()> {
    let mut report = Report::new("enforce_federated_identity_not_granted");
    let world = World::start(federated_options("enforce")).await?;
    let issuer = world.trust_cluster_issuer().await?.issuer;
    let (id2_res, id2_client) = (id_resource(&id_name(2)), id_client(2));
    let teams = Teams::new(&world).await?;
    let (as_a, as_b) = teams.acting(&world);
    let (b, b_client) = (&teams.b, &teams.b_client);
    for ns in ["team-a", "team-b"] {
        world.add_federated_credential(2, &issuer, ns, "default")?;
    }
    let aad = world.emu.aad_url();
    // One answer, 200 with id-2's token.
    let id2_token = |answers: &[Answer]| matches!(answers, [a] if a.code == 200 && a.appid.as_deref() == Some(id2_client.as_str()));
    // ARM writes, IMDS token requests, Entra ID token requests for id-2.
    let calls = || {
        let c = world.emu.counters();
        (
            c.arm_writes.values().sum::<u64>(),
            c.imds_token_requests.values().sum::<u64>(),
            c.aad_token_requests.get(&id2_client).copied().unwrap_or(0),
        )
    };

    let scenario = async {
        let attack = "8 enforce: granted federated identity";
        for yaml in [
            DEFAULT_SERVICE_ACCOUNT.to_string(),
            format!(
                "{}---\n{}",
                federated_identity_yaml("a-fed", &id2_res, &id2_client, &aad),
                binding_yaml("a-fed-binding", "a-fed", "a-fed")
            ),
        ] {
            as_a.apply_cleanly(&mut report, attack, &yaml).await?;
        }
        let a_pod = as_a.running_as_default("a-app", "a-fed", 0).await?;
        wait_pod_assigned(&world, &a_pod).await?;
        let exchanges = calls().2;
        let answers = ask(&world, &a_pod, &[String::new()], 1).await?;
        report.check(
            attack,
            id2_token(&answers),
            format!("team-a's pod gets id-2's token: {answers:?}"),
        );
        report.check(
            attack,
            calls().2 == exchanges + 1,
            format!(
                "through one exchange at Entra ID: {} token request(s) for id-2",
                calls().2 - exchanges
            ),
        );

        let before = calls();
        let scale_sets = world.all_vmss_identities();
        let assigned = versions::<AzureAssignedIdentity>(&world, None).await?;
        let team_a_objects = || async {
            let mut v = versions::<AzureIdentity>(&world, Some("team-a")).await?;
            v.extend(versions::<AzureIdentityBinding>(&world, Some("team-a")).await?);
            anyhow::Ok(v)
        };
        let team_a = team_a_objects().await?;

        let declare_attack = "8 enforce: B declares a federated identity it is not granted";
        as_b.apply(&report, declare_attack, DEFAULT_SERVICE_ACCOUNT)
            .await?;
        let (applied, text) = as_b
            .apply(
                &report,
                declare_attack,
                &federated_identity_yaml("b-fed", &id2_res, &id2_client, &aad),
            )
            .await?;
        report.check(
            declare_attack,
            !applied && text.contains("is not granted the identity"),
            format!("refused at admission with the reason: {}", text.trim()),
        );
        as_b.apply(
            &report,
            declare_attack,
            &binding_yaml("b-fed-binding", "b-fed", "b-fed"),
        )
        .await?;
        let label_attack = "8 enforce: B labels its pod with A's selector";
        let bind_attack = "8 enforce: B binds A's federated identity";
        as_b.apply(
            &report,
            bind_attack,
            &binding_yaml("b-cross", "a-fed", "b-cross"),
        )
        .await?;
        let b_pods = [
            as_b.running_as_default("b-fed", "b-fed", 1).await?,
            as_b.running_as_default("b-with-a-label", "a-fed", 2)
                .await?,
            as_b.running_as_default("b-cross", "b-cross", 3).await?,
        ];
        // mic's verdict on team-a's binding selecting team-b's pod: an
        // Event on team-a's AzureIdentity (bounded).
        let refused = wait_for("mic's IdentityNotGranted Event", VERDICT, || async {
            let events = world
                .events_in(&world.client().await.ok()?, "team-a")
                .await
                .ok()?;
            events
                .into_iter()
                .find(|e| e.contains("IdentityNotGranted") && e.contains("namespace team-b"))
        })
        .await;
        report.check(
            label_attack,
            refused.is_ok(),
            format!("mic refuses and says so: {refused:?}"),
        );
        for line in world
            .events_in(b_client, &b.namespace)
            .await
            .unwrap_or_default()
        {
            report.seen(bind_attack, format!("Event in team-b: {line}"));
        }
        let q = queries(&[(&id2_client, &id2_res)]);
        for (p, attack) in b_pods
            .iter()
            .zip([declare_attack, label_attack, bind_attack])
        {
            let answers = ask(&world, p, &q, 2).await?;
            no_token(&mut report, attack, p, &answers);
            // The exact answer: upstream's for a pod that has no assigned
            // identity after nmi's retries (2 of 1 s in this world).
            let want = json!({
                "error": "not_found",
                "error_description": format!(
                    "getting assigned identities for pod {}/{} in CREATED state failed after 2 attempts, retry duration [1]s, error: <nil>. Check MIC pod logs for identity assignment errors",
                    p.namespace, p.name
                ),
            });
            let wrong: Vec<&Answer> = answers
                .iter()
                .filter(|a| {
                    a.code != 404
                        || serde_json::from_str::<serde_json::Value>(&a.body).ok()
                            != Some(want.clone())
                })
                .collect();
            report.check(
                attack,
                wrong.is_empty() && answers.len() == q.len(),
                format!("{} gets 404 and {want} to every query: {wrong:?}", p.name),
            );
            let aais = aai_lines(&world, p).await?;
            report.check(
                attack,
                aais.is_empty(),
                format!("no AzureAssignedIdentity for {}: {aais:?}", p.name),
            );
        }

        // Nothing else changed.
        let attack = "8 enforce";
        let after = calls();
        report.check(
            attack,
            after == before,
            format!(
                "no ARM write, IMDS token request or Entra ID token request for id-2 during the attacks: (writes, IMDS, Entra) {before:?} -> {after:?}"
            ),
        );
        let now = world.all_vmss_identities();
        report.check(
            attack,
            now == scale_sets,
            format!("the scale sets' identities unchanged: {scale_sets:?} -> {now:?}"),
        );
        let now = versions::<AzureAssignedIdentity>(&world, None).await?;
        report.check(
            attack,
            now == assigned,
            format!("the AzureAssignedIdentities unchanged: {assigned:?} -> {now:?}"),
        );
        let now = team_a_objects().await?;
        report.check(
            attack,
            now == team_a,
            format!("team-a's identity and binding unchanged: {team_a:?} -> {now:?}"),
        );
        let b_ids = Api::<AzureIdentity>::namespaced(b_client.clone(), "team-b")
            .list(&ListParams::default())
            .await?;
        report.check(
            attack,
            b_ids.items.is_empty(),
            format!("team-b has no AzureIdentity: {}", b_ids.items.len()),
        );
        let again = ask(&world, &a_pod, &[String::new()], 1).await?;
        report.check(
            attack,
            id2_token(&again),
            format!("team-a's pod still gets id-2's token: {again:?}"),
        );
        anyhow::Ok(())
    };
    let (result, missing) = world.while_watching_vmss(&[KUBELET, ADDON], scenario).await;
    result?;
    report.check_node_identities_kept("8", &missing);
    report.finish(&world).await
}

/// Attack 5 and the `off` mode (no admission policy, upstream's behaviour;
/// the identity checks still hold):
/// - the happy path: a user's identity, binding and pod; the token through
///   the real Python SDK;
/// - attack 1 again without any policy: `id-3`'s resourceID with the kubelet
///   identity's clientID;
/// - AzureAssignedIdentities written by an administrator (standing for any
///   write that bypassed admission; if an admission policy refuses the write,
///   its bindings are deleted first), with both mic replicas killed so that
///   nothing deletes them and nmi alone must refuse them:
///   `handmade-1`: a made-up identity and binding (the kubelet identity's
///   resourceID and clientID); `handmade-2`: the user's real identity and
///   binding (same UIDs and specs) for a pod whose label the binding does not
///   select; `handmade-3`: the real binding and the real identity's UID with
///   its spec changed to the kubelet identity, for a pod the binding selects.
///   nmi serves none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_assigned_identity_and_policy_off() -> anyhow::Result<()> {
    let (mut report, mut world) = start("forged_assigned_identity_and_policy_off", "off").await?;
    let (id2_res, id2_client) = (id_resource(&id_name(2)), id_client(2));
    let kubelet_res = node_identity_resource(KUBELET);
    let user = world.namespace_user("tenant", None).await?;
    let seeds = world.namespace_user("seeds", None).await?;
    let client = user.client().await?;
    let as_user = Acting::new(&world, &user, &client);
    let admin = world.client().await?;

    let scenario = async {
        seeds_get_tokens(&mut report, &world, "7 off: seed manifests", &seeds, (5, 6)).await?;
        let attack = "7 off: happy path";
        let (ok, text) = as_user
            .apply(&report, attack, &declare("app-id", &id2_res, &id2_client))
            .await?;
        report.check(attack, ok, format!("applies: {}", text.trim()));
        let app = as_user.bound("app", "app-id", 0).await?;
        wait_pod_assigned(&world, &app).await?;
        check_python_token(&mut report, &world, attack, &app, &id2_client).await;

        let attack = "1 off: forged clientID (kubelet)";
        let id3_res = id_resource(&id_name(3));
        as_user
            .apply(
                &report,
                attack,
                &declare("forged-kubelet", &id3_res, KUBELET_CLIENT),
            )
            .await?;
        let forged = as_user.bound("forged", "forged-kubelet", 1).await?;
        wait_verdicts(&report, &world, attack, &[&forged]).await;
        let kubelet = (KUBELET_CLIENT, kubelet_res.as_str());
        let answers = ask(&world, &forged, &queries(&[kubelet]), 2).await?;
        no_token(&mut report, attack, &forged, &answers);
        as_user
            .check_told(&mut report, attack, &["forged-kubelet"], &[&forged])
            .await?;
        anyhow::Ok(())
    };
    let (result, missing) = world.while_watching_vmss(&[KUBELET, ADDON], scenario).await;
    result?;
    report.check_node_identities_kept("1 off", &missing);

    // 5: hand-written AzureAssignedIdentities, mic stopped.
    let attack = "5: hand-written AAI";
    for r in 0..world.mics.len() {
        world.signal_mic(r, "KILL")?;
    }
    report.seen(attack, "both mic replicas killed");
    let world = &world;
    let as_user = Acting::new(world, &user, &client);
    let scenario = async {
        let p1 = as_user.bound("handmade-1", "nothing", 2).await?;
        let p2 = as_user.bound("handmade-2", "not-app-id", 3).await?;
        let p3 = as_user.bound("handmade-3", "app-id", 4).await?;
        let strip = |mut v: serde_json::Value| {
            if let Some(m) = v["metadata"].as_object_mut() {
                m.remove("managedFields");
            }
            v
        };
        let real_id = strip(serde_json::to_value(
            Api::<AzureIdentity>::namespaced(admin.clone(), &user.namespace)
                .get("app-id")
                .await?,
        )?);
        let real_binding = strip(serde_json::to_value(
            Api::<AzureIdentityBinding>::namespaced(admin.clone(), &user.namespace)
                .get("app-id-binding")
                .await?,
        )?);
        let mut changed_id = real_id.clone();
        changed_id["spec"]["resourceID"] = json!(kubelet_res);
        changed_id["spec"]["clientID"] = json!(KUBELET_CLIENT);
        let made_up_id = json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
            "metadata": {"name": "cluster", "namespace": user.namespace, "uid": "00000000-0000-4000-8000-000000000001"},
            "spec": {"type": 0, "resourceID": kubelet_res, "clientID": KUBELET_CLIENT},
        });
        let made_up_binding = json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
            "metadata": {"name": "cluster-binding", "namespace": user.namespace, "uid": "00000000-0000-4000-8000-000000000002"},
            "spec": {"azureIdentity": "cluster", "selector": "nothing"},
        });
        let aai = |pod: &PodRef, identity: &serde_json::Value, binding: &serde_json::Value| {
            let node = world.nodes[pod.node].name.clone();
            json!({
                "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureAssignedIdentity",
                "metadata": {
                    "name": format!("{}-{}-{}", pod.name, pod.namespace, identity["metadata"]["name"].as_str().unwrap_or_default()),
                    "namespace": "default",
                    "labels": {"nodename": node},
                },
                "spec": {
                    "azureIdentityRef": identity, "azureBindingRef": binding,
                    "pod": pod.name, "podNamespace": pod.namespace, "nodename": node,
                },
                "status": {"status": "Assigned", "availableReplicas": 1},
            })
        };
        let forged_aais = [
            (
                &p1,
                aai(&p1, &made_up_id, &made_up_binding),
                (KUBELET_CLIENT, kubelet_res.as_str()),
            ),
            (
                &p2,
                aai(&p2, &real_id, &real_binding),
                (id2_client.as_str(), id2_res.as_str()),
            ),
            (
                &p3,
                aai(&p3, &changed_id, &real_binding),
                (KUBELET_CLIENT, kubelet_res.as_str()),
            ),
        ];
        let aais: Api<AzureAssignedIdentity> = Api::namespaced(admin.clone(), "default");
        for (pod, body, _) in &forged_aais {
            let obj: AzureAssignedIdentity = serde_json::from_value(body.clone())?;
            create_bypassing_admission(&report, world, attack, &aais, &obj).await?;
            report.seen(
                attack,
                format!(
                    "wrote AAI for {}: {}",
                    pod.name, body["spec"]["azureIdentityRef"]["spec"]
                ),
            );
        }
        // nmi's caches see the AAIs within a moment; ask for a few seconds.
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (pod, _, target) in &forged_aais {
            let answers = ask(world, pod, &queries(&[*target]), 3).await?;
            no_token(&mut report, attack, pod, &answers);
        }
        for (_, body, _) in &forged_aais {
            let name = body["metadata"]["name"].as_str().unwrap_or_default();
            aais.delete(name, &DeleteParams::default()).await?;
        }
        anyhow::Ok(())
    };
    let (result, missing) = world.while_watching_vmss(&[KUBELET, ADDON], scenario).await;
    result?;
    report.check_node_identities_kept("5", &missing);
    report.finish(world).await
}

/// Creates `aai` as the administrator. If admission refuses it (the chart's
/// policy lets only mic's ServiceAccount write them), reports the refusal,
/// deletes every ValidatingAdmissionPolicyBinding (standing for a bypass of
/// admission) and retries until the apiserver stops enforcing them (bounded).
async fn create_bypassing_admission(
    report: &Report,
    world: &World,
    attack: &str,
    api: &Api<AzureAssignedIdentity>,
    aai: &AzureAssignedIdentity,
) -> anyhow::Result<()> {
    use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding;
    match api.create(&PostParams::default(), aai).await {
        Ok(_) => {
            report.seen(attack, "the administrator's AAI write was admitted");
            return Ok(());
        }
        Err(e) => report.seen(
            attack,
            format!("the administrator's AAI write was refused: {e}"),
        ),
    }
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(world.client().await?);
    for b in bindings.list(&ListParams::default()).await? {
        if let Some(name) = b.metadata.name {
            bindings.delete(&name, &DeleteParams::default()).await?;
        }
    }
    wait_for(
        "the AAI admitted without policy bindings",
        Duration::from_secs(30),
        || async { api.create(&PostParams::default(), aai).await.ok().map(drop) },
    )
    .await?;
    report.seen(attack, "written after deleting the policy bindings");
    Ok(())
}
