//! The migration's Helm path (docs/migration.md, "Path 1: Helm") on real
//! nodes: upstream v1.8.17's own chart (4.1.18) and images run by a real
//! kubelet, containerd and runc on two nodes (`aadpodid_tests::realhelm`),
//! an application pod gets its identity's token through upstream's nmi;
//! then the documented steps (save the values, apply this project's CRDs,
//! `helm upgrade` to this chart with the saved values) while the
//! application keeps asking once a second, and `helm rollback` to
//! upstream's revision.
//!
//! Checked across the upgrade: the mic Deployment and the nmi DaemonSet are
//! updated in place (same uid), every mic and nmi pod then runs this
//! project's images and is Ready, the application's tries kept getting
//! tokens (at most a few refused in the instant between the old nmi's exit
//! and the new one's bind) and none reached the node's IMDS directly, the
//! AzureAssignedIdentities upstream's mic made are adopted with no ARM write
//! to the scale set, and a pod started after the upgrade gets its token
//! through this project's nmi. Across the rollback: upstream's pods come
//! back and the application gets tokens again, none reaching IMDS directly.
//!
//! Needs root, the cluster binaries, the node binaries and the images of
//! `scripts/images.sh --upstream` (built on first use when missing). Every
//! wait is bounded.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aadpodid_testkit::realcloud::{AAD_PORT, ARM_PUBLIC_HOST, CLOUD_IP};
use aadpodid_testkit::tenant::{self, APP_ID, APP_RG, APP2_ID, CloudEnvironment, MicCloud};
use aadpodid_testkit::{helm, wait_for};
use aadpodid_tests::realhelm::{
    self, APP_POD, ImageRef, RELEASE, Steps, TOKEN_TIMEOUT, TRIES_KEPT, Up, VMSS,
    after_first_token, build_images, chart_images, container_log,
};
use anyhow::{Context as _, ensure};

/// How many of the application's tries may be refused while nmi rolls
/// from upstream's to ours: the old nmi answers until it exits and the new
/// one binds its port right after, so only tries in that instant can fail.
const MAX_REFUSED_UPGRADE: usize = 3;

/// A Helm post-renderer for upstream's chart only (arguments: the CA file,
/// the cloud's address, ARM's host name). Upstream's chart cannot make mic
/// trust a custom cloud's own CA, and upstream's mic can reach ARM only by
/// a name of public ARM's audiences (see `ARM_PUBLIC_HOST`); on AKS, ARM is
/// that name, signed by public CAs the image trusts. It adds to the mic
/// Deployment exactly: `SSL_CERT_FILE` (Go's root CAs) naming the test's
/// CA, that file as a read-only hostPath mount, and a host alias of ARM's
/// name to the cloud's address. Anything else unchanged; it fails when an
/// anchor it inserts after is not found exactly once.
const POST_RENDERER: &str = r##"#!/usr/bin/env python3
import sys
ca, ip, host = sys.argv[1:4]
text = sys.stdin.read()
marker = "# Source: aad-pod-identity/templates/mic-deployment.yaml\n"
start = text.index(marker)
end = text.find("\n---", start)
end = len(text) if end < 0 else end
doc = text[start:end]
def after(doc, anchor, lines):
    if doc.count(anchor) != 1:
        sys.exit("post-render: %r found %d times" % (anchor, doc.count(anchor)))
    return doc.replace(anchor, anchor + lines)
doc = after(doc, "\n    spec:\n",
            '      hostAliases:\n      - ip: "%s"\n        hostnames: ["%s"]\n' % (ip, host))
doc = after(doc, "\n        env:\n",
            '          - name: SSL_CERT_FILE\n            value: "%s"\n' % ca)
doc = after(doc, "\n        volumeMounts:\n",
            "          - name: cloud-ca\n            mountPath: %s\n            readOnly: true\n" % ca)
doc = after(doc, "\n      volumes:\n",
            "      - name: cloud-ca\n        hostPath:\n          path: %s\n          type: File\n" % ca)
sys.stdout.write(text[:start] + doc + text[end:])
"##;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_upgrade_from_upstream_on_real_nodes() -> anyhow::Result<()> {
    let mut steps = Steps::new("real migration");
    let ours = chart_images()?;
    let theirs = build_images(&["upstream-mic", "upstream-nmi"])?;
    steps.mark("images");
    let mut up = realhelm::start(
        &mut steps,
        &[&ours.mic, &ours.nmi, &ours.app, &theirs[0].1, &theirs[1].1],
    )
    .await?;
    let our_mic = up.image("localhost/aad-pod-identity/mic:")?;
    let our_nmi = up.image("localhost/aad-pod-identity/nmi:")?;
    let their_mic = up.image("localhost/upstream-mic:")?;
    let their_nmi = up.image("localhost/upstream-nmi:")?;
    // What kube-proxy does on every real node (upstream's nmi DNATs to
    // 127.0.0.1 and never sets it; this project's chart can, but the
    // user's values of an upstream release do not ask for it).
    for node in &up.nodes {
        node.netns()
            .run("sysctl", &["-qw", "net.ipv4.conf.all.route_localnet=1"])?;
    }

    // 1. Upstream's release, as a user installed it.
    install_upstream(&up, &their_mic, &their_nmi)?;
    steps.mark("upstream's helm install");
    up.wait_pods_of(&their_mic.reference(), &their_nmi.reference())
        .await?;
    steps.mark("upstream's mic 2/2 and nmi 2/2 Ready");

    // 2. The seeds and the application, served by upstream's mic and nmi.
    up.seed(&mut steps).await?;
    // Upstream's nmi answered the app: its log has a 200 for the app's
    // address on the token path.
    let (_, app_ip) = up.app_placement().await?;
    let nmi_log = container_log(&up.node_refs(), RELEASE, "nmi", TRIES_KEPT);
    let served = nmi_log
        .lines()
        .filter(|l| {
            l.contains("status (200)")
                && l.contains("/metadata/identity/oauth2/token")
                && l.split_whitespace()
                    .any(|w| w == format!("req.remote={app_ip}"))
        })
        .count();
    eprintln!("real migration: upstream's nmi answered {served} token requests of the app");
    ensure!(served > 0, "upstream's nmi log: {nmi_log}");
    let assigned_before = assigned_by_name(&up)?;
    ensure!(
        assigned_before.len() >= 2 && assigned_before.values().all(|(_, s)| s == "Assigned"),
        "{assigned_before:?}"
    );

    // 3. docs/migration.md, Path 1.
    let dir = up.dir.path().to_path_buf();
    let old_values = dir.join("old-values.yaml");
    let values = up.helm(&["get", "values", RELEASE, "-n", RELEASE, "-o", "yaml"])?;
    std::fs::write(&old_values, &values)?;
    let crds = helm::chart_dir().join("crds/crd.yaml");
    let out = up.cluster.kubectl_run(
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            &crds.display().to_string(),
        ],
        None,
    )?;
    ensure!(out.success, "our CRDs: {}", out.stderr);
    steps.mark("values saved, our CRDs applied");
    let uids_before = workload_uids(&up)?;
    let writes_before = vmss_writes(&up);
    let tries_before = up.tries(APP_POD).len();
    // The user's values, plus only what differs here from a real cluster:
    // the images (this project's, by the same keys) and the test cloud (the
    // environment file with ARM at its address, and the CA that signs it:
    // this chart's own value for that).
    let sets = [
        ("image.repository", our_mic.repository.clone()),
        ("mic.image", our_mic.name.clone()),
        ("mic.tag", our_mic.tag.clone()),
        ("nmi.image", our_nmi.name.clone()),
        ("nmi.tag", our_nmi.tag.clone()),
        (
            "mic.customCloud.configPath",
            up.files.environment.display().to_string(),
        ),
        (
            "mic.customCloud.caBundlePath",
            up.ca.ca.display().to_string(),
        ),
    ];
    let old_values = old_values.display().to_string();
    let rolled_in = roll(
        &mut up,
        |up| up.helm_chart("upgrade", &["-f", &old_values], &sets, &[]),
        &our_mic,
        &our_nmi,
    )
    .await?;
    steps.mark("helm upgrade: our mic 2/2 and nmi 2/2 Ready");

    let uids_after = workload_uids(&up)?;
    ensure!(
        uids_after == uids_before,
        "mic Deployment and nmi DaemonSet uids {uids_before:?} -> {uids_after:?}"
    );
    let all = up.tries(APP_POD);
    let during = all.len().saturating_sub(tries_before);
    let (after_first, failed) = after_first_token(all);
    eprintln!(
        "real migration: upgrade rolled in {rolled_in:.1?}; {during} tries since the upgrade \
         started, {} not answered with a token: {failed:?}",
        failed.len()
    );
    ensure!(
        failed.len() <= MAX_REFUSED_UPGRADE && after_first.last().is_some_and(|t| t["ok"] == true),
        "tries after the first token: {after_first:#?}"
    );
    let calls = up.check_imds_callers().await?;
    eprintln!("real migration: IMDS connections per node (all from nmi on the node): {calls:?}");
    // The assignments upstream's mic made are adopted: still there,
    // Assigned, the identities still on the scale set.
    let assigned_after = assigned_by_name(&up)?;
    let kept = assigned_before
        .iter()
        .filter(|(name, (uid, _))| assigned_after.get(*name).is_some_and(|(u, _)| u == uid))
        .count();
    eprintln!(
        "real migration: {kept} of {} AzureAssignedIdentities kept their uid; after: \
         {assigned_after:?}",
        assigned_before.len()
    );
    for (name, (_, status)) in &assigned_before {
        ensure!(
            assigned_after.get(name).is_some_and(|(_, s)| s == status),
            "{name}: {assigned_after:?}"
        );
    }
    check_on_scale_set(&up)?;

    // A pod started now gets its token through this project's nmi (the
    // only nmi left).
    up.start_app("newpod").await?;
    steps.mark("a new pod's token through our nmi");
    let writes = vmss_writes(&up) - writes_before;
    eprintln!("real migration: ARM writes to the scale set across the upgrade: {writes}");
    ensure!(writes == 0, "{writes} ARM writes to the scale set");

    // 4. `helm rollback RELEASE 1`: upstream's objects again.
    let tries_before = up.tries(APP_POD).len();
    let rolled_in = roll(
        &mut up,
        |up| up.helm(&["rollback", RELEASE, "1", "-n", RELEASE]),
        &their_mic,
        &their_nmi,
    )
    .await?;
    steps.mark("helm rollback: upstream's mic 2/2 and nmi 2/2 Ready");
    wait_for("the app's tokens after the rollback", TOKEN_TIMEOUT, || {
        let up = &up;
        async move { (up.tries(APP_POD).last()?["ok"] == true).then_some(()) }
    })
    .await
    .map_err(|e| e.context(up.diagnostics()))?;
    let all = up.tries(APP_POD);
    let since: Vec<_> = all.iter().skip(tries_before).collect();
    let failed: Vec<_> = since.iter().filter(|t| t["ok"] != true).collect();
    eprintln!(
        "real migration: rollback rolled in {rolled_in:.1?}; {} tries since it started, {} not \
         answered with a token: {failed:?}",
        since.len(),
        failed.len()
    );
    ensure!(
        since.iter().any(|t| t["ok"] == true),
        "no token since the rollback: {since:?}"
    );
    let calls = up.check_imds_callers().await?;
    eprintln!("real migration: IMDS connections per node after the rollback: {calls:?}");
    check_on_scale_set(&up)?;
    steps.mark("app's tokens through upstream's nmi again");

    // 5. Everything down, nothing left on the nodes.
    up.tear_down(&mut steps)?;
    steps.print();
    Ok(())
}

/// `helm install` of upstream's chart 4.1.18 with a user's values file:
/// upstream's images by upstream's keys, never pulled; MIC's cloud config
/// and custom-cloud files and nmi's kubelet config from the node. Through
/// [`POST_RENDERER`].
fn install_upstream(up: &Up, mic: &ImageRef, nmi: &ImageRef) -> anyhow::Result<()> {
    let dir = up.dir.path();
    // Upstream's environment file: ARM by public ARM's name (the host alias
    // resolves it to the cloud's address), Entra ID at the cloud's address.
    let env = CloudEnvironment::at(
        &format!("https://{ARM_PUBLIC_HOST}/"),
        &format!("https://{CLOUD_IP}:{AAD_PORT}/"),
    );
    let files = tenant::write_mic_cloud_files(dir, "upstream-", &MicCloud::standard(), &env)?;
    let values = serde_json::json!({
        "image": {"repository": mic.repository, "imagePullPolicy": "Never"},
        "mic": {
            "image": mic.name,
            "tag": mic.tag,
            "cloudConfig": files.azure_json,
            "customCloud": {"enabled": true, "configPath": files.environment},
        },
        "nmi": {
            "image": nmi.name,
            "tag": nmi.tag,
            "kubeletConfig": up.kubelet_config,
        },
    });
    ensure!(
        nmi.repository == mic.repository,
        "one repository for both: {mic:?} {nmi:?}"
    );
    let values_file = dir.join("upstream-values.yaml");
    std::fs::write(&values_file, values.to_string())?;
    let renderer = dir.join("post-render-upstream-mic.py");
    std::fs::write(&renderer, POST_RENDERER)?;
    std::fs::set_permissions(
        &renderer,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let chart = helm::upstream_chart()?.display().to_string();
    let (values_file, renderer) = (
        values_file.display().to_string(),
        renderer.display().to_string(),
    );
    let ca = up.ca.ca.display().to_string();
    let ip = CLOUD_IP.to_string();
    up.helm(&[
        "install",
        RELEASE,
        &chart,
        "--namespace",
        RELEASE,
        "--create-namespace",
        "-f",
        &values_file,
        "--post-renderer",
        &renderer,
        "--post-renderer-args",
        &ca,
        "--post-renderer-args",
        &ip,
        "--post-renderer-args",
        ARM_PUBLIC_HOST,
    ])?;
    Ok(())
}

/// The uids of the mic Deployment and the nmi DaemonSet.
fn workload_uids(up: &Up) -> anyhow::Result<(String, String)> {
    let uid = |kind: &str, name: &str| -> anyhow::Result<String> {
        let obj = helm::get_json(&up.cluster, &[kind, name, "-n", RELEASE])?;
        obj["metadata"]["uid"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("{kind} {name} has no uid"))
    };
    Ok((
        uid("deployment", "aad-pod-identity-mic")?,
        uid("daemonset", "aad-pod-identity-nmi")?,
    ))
}

/// Each AzureAssignedIdentity's uid and status, by name.
fn assigned_by_name(up: &Up) -> anyhow::Result<BTreeMap<String, (String, String)>> {
    Ok(up
        .assigned()?
        .iter()
        .map(|a| {
            let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
            (
                text(&a["metadata"]["name"]),
                (text(&a["metadata"]["uid"]), text(&a["status"]["status"])),
            )
        })
        .collect())
}

/// ARM writes (PUT or PATCH, accepted or not) to the nodes' scale set so
/// far.
fn vmss_writes(up: &Up) -> u64 {
    let needle = format!("/virtualmachinescalesets/{VMSS}");
    up.emu
        .counters()
        .arm_writes
        .iter()
        .filter(|(id, _)| id.to_ascii_lowercase().contains(&needle))
        .map(|(_, n)| n)
        .sum()
}

/// Both seeds' identities are on the scale set.
fn check_on_scale_set(up: &Up) -> anyhow::Result<()> {
    let on_vmss = up.emu.assigned_identities(VMSS).unwrap_or_default();
    for name in [APP_ID, APP2_ID] {
        let id = tenant::uai_id(APP_RG, name);
        ensure!(
            on_vmss.iter().any(|i| i.eq_ignore_ascii_case(&id)),
            "{name} not on the scale set: {on_vmss:?}"
        );
    }
    Ok(())
}

/// Runs `helm` (an upgrade or a rollback), waits until the release's pods
/// are exactly two mic pods of `mic` and two nmi pods of `nmi`, all Ready,
/// then for two more tries of the application; returns how long the pods
/// took.
async fn roll(
    up: &mut Up,
    helm: impl FnOnce(&Up) -> anyhow::Result<String>,
    mic: &ImageRef,
    nmi: &ImageRef,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    helm(up)?;
    up.wait_pods_of(&mic.reference(), &nmi.reference()).await?;
    let rolled_in = started.elapsed();
    let count = up.tries(APP_POD).len() + 2;
    let up = &*up;
    wait_for(
        "more tries of the app",
        Duration::from_secs(30),
        || async move { (up.tries(APP_POD).len() >= count).then_some(()) },
    )
    .await?;
    Ok(rolled_in)
}
