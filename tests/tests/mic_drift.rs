//! MIC's drift checks on the real apiserver and the Azure emulator, with the
//! chart's defaults (the periodic safety net every 30 minutes, so it never
//! runs during the test): identities removed from a scale set behind MIC's
//! back come back from events, one scale set at a time, and nothing else
//! makes MIC call ARM.
//!
//! One world, in order:
//! - idle: with nothing changing, MIC makes no ARM call at all;
//! - an `IdentityNotOnNode` Event created by a namespace user in its own
//!   namespace (the only one it may write Events in) triggers nothing, and
//!   the user cannot create one in the release namespace;
//! - a Node's boot ID changes: MIC checks that node's scale set and re-adds
//!   the identities within seconds (the other scale sets are not read); the
//!   same for a Node's node-image label, on a third scale set;
//! - a pod asks NMI for a token of an identity stripped from its scale set:
//!   IMDS answers "Identity not found", NMI publishes the Event in the release
//!   namespace, MIC re-adds the identity, and the pod's later request
//!   succeeds.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use aadpodid_tests::e2e::{KUBELET, Options, PodRef, RELEASE_NS, World, vmss_name};
use aadpodid_tests::wait_for;
use anyhow::Context as _;
use azure_emulator::Service;
use k8s_openapi::api::core::v1::{Event, Node};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const ASSIGN: Duration = Duration::from_secs(120);
/// How long a re-add triggered by an event may take (a scale-set write is 45
/// emulated seconds, 1.5 s at the world's clock).
const READD: Duration = Duration::from_secs(20);
/// The idle spell over which MIC must make no ARM call.
const IDLE: Duration = Duration::from_secs(20);
/// The namespace user's own namespace.
const USER_NS: &str = "tenant";

fn options() -> Options {
    Options::new(env!("CARGO_BIN_EXE_e2e-mic"), env!("CARGO_BIN_EXE_e2e-nmi"))
}

/// The ARM requests the emulator received after `since` (method and path).
fn arm_requests_since(world: &World, since: u64) -> Vec<String> {
    world
        .emu
        .requests(since)
        .into_iter()
        .filter(|r| r.service == Service::Arm)
        .map(|r| format!("{} {}", r.method, r.uri))
        .collect()
}

fn last_seq(world: &World) -> u64 {
    world.emu.requests(0).last().map_or(0, |r| r.seq)
}

/// Strips from `vmss` the identities MIC put there (all but the kubelet's).
fn strip(world: &World, want: &BTreeMap<String, BTreeSet<String>>, vmss: &str) -> usize {
    let ours: Vec<&str> = want[vmss]
        .iter()
        .filter(|n| !n.eq_ignore_ascii_case(KUBELET))
        .map(String::as_str)
        .collect();
    let stripped = world.emu.strip_identities(vmss, Some(&ours));
    assert_eq!(stripped, ours.len(), "stripped {ours:?} from {vmss}");
    stripped
}

/// An `IdentityNotOnNode` Event about Node `node`, in `namespace`.
fn not_on_node_event(namespace: &str, node: &str) -> anyhow::Result<Event> {
    Ok(serde_json::from_value(json!({
        "metadata": {"generateName": "forged-", "namespace": namespace},
        "reason": mic::drift::REASON_IDENTITY_NOT_ON_NODE,
        "type": "Warning",
        "message": "forged",
        "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node, "namespace": namespace},
    }))?)
}

#[test]
fn nmi_publishes_the_reason_mic_watches() {
    assert_eq!(
        mic::drift::REASON_IDENTITY_NOT_ON_NODE,
        nmi::server::REASON_IDENTITY_NOT_ON_NODE
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drift_is_caught_from_events_and_idle_mic_calls_no_arm() -> anyhow::Result<()> {
    let mut opts = options();
    // The chart's `<fullname>-edit` role, which the namespace user is given.
    opts.set_values(&[("rbac.createUserFacingClusterRoles", "true")]);
    // A scale set per trigger (each one's checks are bounded per resource).
    opts.scale_sets = 3;
    let world = World::start(opts).await?;
    let client = world.client().await?;
    // One pod per node, over the five identities.
    let pods = world
        .create_pods(0, world.nodes.len(), |i| Some(i % 5))
        .await?;
    world.wait_assigned(&pods, ASSIGN).await?;
    let want = world.expected_identities(&pods);
    world.wait_vmss(&want, Duration::from_secs(30)).await?;
    let (vmss0, vmss1, vmss2) = (vmss_name(0), vmss_name(1), vmss_name(2));
    let on = |vmss: &str| -> Vec<&PodRef> {
        pods.iter()
            .filter(|p| world.nodes[p.node].vmss == vmss)
            .collect()
    };
    let (pod0, pod1, pod2) = (
        on(&vmss0)[0].clone(),
        on(&vmss1)[0].clone(),
        on(&vmss2)[0].clone(),
    );

    // (c) Idle: no ARM call at all.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let since = last_seq(&world);
    tokio::time::sleep(IDLE).await;
    let idle_calls = arm_requests_since(&world, since);
    eprintln!(
        "idle {IDLE:?}: {} ARM requests {idle_calls:?}",
        idle_calls.len()
    );
    assert!(idle_calls.is_empty(), "{idle_calls:?}");

    // (d) A namespace user's Event in its own namespace triggers nothing.
    strip(&world, &want, &vmss0);
    let stripped0 = world.vmss_identities(&vmss0);
    let user = world.namespace_user(USER_NS, None).await?;
    // Events are not in `edit`: this cluster also lets the user write them
    // in its namespace, the most a namespace user can get.
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "event-writer", "namespace": USER_NS},
        "rules": [{"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}],
    }))?;
    Api::<Role>::namespaced(client.clone(), USER_NS)
        .create(&PostParams::default(), &role)
        .await?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "event-writer", "namespace": USER_NS},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "event-writer"},
        "subjects": [{"kind": "ServiceAccount", "name": user.name, "namespace": user.namespace}],
    }))?;
    Api::<RoleBinding>::namespaced(client.clone(), USER_NS)
        .create(&PostParams::default(), &binding)
        .await?;
    let user_client = user.client().await?;
    let node0 = world.nodes[pod0.node].name.clone();
    let since = last_seq(&world);
    let ev = not_on_node_event(USER_NS, &node0)?;
    wait_for("the user's Event", Duration::from_secs(10), || async {
        Api::<Event>::namespaced(user_client.clone(), USER_NS)
            .create(&PostParams::default(), &ev)
            .await
            .ok()
    })
    .await?;
    let forbidden = Api::<Event>::namespaced(user_client.clone(), RELEASE_NS)
        .create(
            &PostParams::default(),
            &not_on_node_event(RELEASE_NS, &node0)?,
        )
        .await;
    assert!(
        matches!(&forbidden, Err(kube::Error::Api(e)) if e.code == 403),
        "a namespace user writes Events in the release namespace: {forbidden:?}"
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let calls = arm_requests_since(&world, since);
    assert!(
        calls.is_empty(),
        "the user's Event made MIC call ARM: {calls:?}"
    );
    assert_eq!(world.vmss_identities(&vmss0), stripped0);

    // (a) The node's boot ID changes: its scale set is checked and repaired.
    let since = last_seq(&world);
    let t = Instant::now();
    Api::<Node>::all(client.clone())
        .patch_status(
            &node0,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"nodeInfo": {"bootID": "rebooted-1"}}})),
        )
        .await
        .context("patch the Node's bootID")?;
    // (wait_vmss compares every scale set; the other one is untouched.)
    world.wait_vmss(&want, READD).await?;
    eprintln!("boot ID change: identities back {:.1?} after", t.elapsed());
    let calls = arm_requests_since(&world, since);
    eprintln!("ARM requests for it: {calls:?}");
    for other in [&vmss1, &vmss2] {
        let other = other.to_lowercase();
        assert!(
            !calls.iter().any(|c| c.to_lowercase().contains(&other)),
            "another scale set was read: {calls:?}"
        );
    }
    world.wait_tokens(&[pod0], Duration::from_secs(30)).await?;

    // The same for a new node image (the label AKS sets) on scale set 2.
    strip(&world, &want, &vmss2);
    let node2 = world.nodes[pod2.node].name.clone();
    let t = Instant::now();
    Api::<Node>::all(client.clone())
        .patch(
            &node2,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                mic::drift::LABEL_NODE_IMAGE_VERSION: "AKSUbuntu-2204gen2containerd-202512.01.0",
            }}})),
        )
        .await
        .context("label the Node's node image")?;
    world.wait_vmss(&want, READD).await?;
    eprintln!(
        "node image change: identities back {:.1?} after",
        t.elapsed()
    );
    world.wait_tokens(&[pod2], Duration::from_secs(30)).await?;

    // (b) NMI sees the identity missing on IMDS: Event, MIC re-adds, the
    // pod's later request succeeds.
    strip(&world, &want, &vmss1);
    let t = Instant::now();
    let (status, body) = world.curl_token(&pod1, 30).await?;
    eprintln!("token with the identity stripped: {status} {body}");
    assert_ne!(status, 200, "{body}");
    let node1 = world.nodes[pod1.node].name.clone();
    let events = wait_for("NMI's IdentityNotOnNode Event", READD, || async {
        let lines = world.events_in(&client, RELEASE_NS).await.ok()?;
        let hit = lines.iter().any(|l| {
            l.starts_with(&format!("Node/{node1} "))
                && l.contains(mic::drift::REASON_IDENTITY_NOT_ON_NODE)
        });
        hit.then_some(lines)
    })
    .await?;
    eprintln!("{events:?}");
    world.wait_vmss(&want, READD).await?;
    world.wait_tokens(&[pod1], Duration::from_secs(30)).await?;
    eprintln!(
        "IMDS 'Identity not found': identities back and the token served {:.1?} after the first request",
        t.elapsed()
    );
    Ok(())
}
