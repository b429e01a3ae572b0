//! `helm install` of the chart on real nodes: the mic and nmi images that
//! `scripts/images.sh` builds, run by a real kubelet, containerd and runc on
//! two nodes (each a network namespace of the test's own, its Node's
//! providerID naming its emulated scale-set instance), with the chart's own
//! probes, securityContext, mounts and in-cluster configuration (the
//! ServiceAccount token the kubelet mounts, the `kubernetes` Service).
//!
//! Inside each node 169.254.169.254 is the emulator's IMDS for that machine
//! and 10.253.0.1 its ARM and Entra ID (TLS with a certificate of the test's
//! own CA, which MIC trusts through the chart's custom-cloud values). The
//! seed manifests (an AzureIdentity and its binding) are applied unchanged;
//! an application pod of the binding's label then gets a token through
//! 169.254.169.254, redirected by nmi.
//!
//! Needs root, the cluster binaries, the node binaries and the images (all
//! built on first use when missing). Every wait is bounded.

use std::path::Path;
use std::time::Duration;

use aadpodid_testkit::realnode::RealNode;
use aadpodid_testkit::{helm, wait_for};
use aadpodid_tests::realhelm::{
    self, APP_NS, APP_POD, RELEASE, Steps, Up, WORKLOADS_TIMEOUT, after_first_token, chart_images,
};
use anyhow::{Context as _, ensure};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_runs_the_chart_on_real_nodes() -> anyhow::Result<()> {
    let mut steps = Steps::new("real helm");
    let mut up = up(&mut steps).await?;

    // `helm upgrade` with a changed value rolls nmi (a surge rollout: the
    // new pod is ready before the old one stops) while the app keeps asking
    // once a second.
    let before = up.nmi_pods().await?;
    let tries_before = up.tries(APP_POD).len();
    up.helm(&[
        "upgrade",
        RELEASE,
        &helm::chart_dir().display().to_string(),
        "--namespace",
        RELEASE,
        "--reuse-values",
        "--set",
        "nmi.logVerbosity=1",
    ])?;
    wait_for("nmi rolled on both nodes", WORKLOADS_TIMEOUT, || {
        let (up, before) = (&up, &before);
        async move {
            let now = up.nmi_pods().await.ok()?;
            (now.len() == 2 && now.iter().all(|p| !before.contains(p))).then_some(())
        }
    })
    .await
    .map_err(|e| e.context(up.diagnostics()))?;
    up.wait_workloads().await?;
    steps.mark("helm upgrade: nmi rolled");
    // The app's tries during the rollout: each got a token (nmi answered
    // throughout), and the IMDS relays never saw a pod's address.
    let (after_first, failed) = after_first_token(up.tries(APP_POD));
    let tries_after = up.tries(APP_POD).len();
    ensure!(
        failed.is_empty() && tries_after >= tries_before + 2,
        "tries after the first token ({tries_before} before the upgrade, {tries_after} after \
         the rollout): {after_first:#?}"
    );
    up.check_imds_callers().await?;

    // `helm uninstall`: nmi removes its redirect from each node as it goes.
    up.helm(&[
        "uninstall",
        RELEASE,
        "--namespace",
        RELEASE,
        "--wait",
        "--timeout",
        "120s",
    ])?;
    realhelm::wait_no_redirect(&up.nodes).await?;
    wait_for("nmi's pods gone", Duration::from_secs(90), || {
        let up = &up;
        async move { up.nmi_pods().await.ok()?.is_empty().then_some(()) }
    })
    .await?;
    steps.mark("helm uninstall: redirect gone");

    up.tear_down(&mut steps)?;
    steps.print();
    Ok(())
}

/// `mic.customCloud.caBundlePath` (what the test above sets so that MIC
/// trusts the cloud's CA) mounts that node file into MIC's container and
/// names it in `SSL_CERT_FILE`; unset, neither is there.
#[test]
fn custom_cloud_ca_bundle_renders_a_mount_and_ssl_cert_file() -> anyhow::Result<()> {
    let mic = |with_ca: bool| -> anyhow::Result<serde_json::Value> {
        let mut render = helm::Render::new(RELEASE, RELEASE)
            .set("mic.customCloud.enabled", "true")
            .set_string(
                "mic.customCloud.configPath",
                "/etc/kubernetes/akscustom.json",
            );
        if with_ca {
            render = render.set_string("mic.customCloud.caBundlePath", "/etc/ssl/cloud-ca.pem");
        }
        let docs = helm::template(&render)?;
        let deployment = docs
            .iter()
            .find(|d| d["kind"] == "Deployment")
            .context("no Deployment rendered")?;
        Ok(deployment["spec"]["template"]["spec"].clone())
    };
    for with_ca in [true, false] {
        let spec = mic(with_ca)?;
        let container = &spec["containers"][0];
        let env = container["env"].as_array().cloned().unwrap_or_default();
        let ssl = env.iter().find(|e| e["name"] == "SSL_CERT_FILE");
        let mount = container["volumeMounts"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == "custom-cloud-ca").cloned());
        let volume = spec["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "custom-cloud-ca").cloned());
        if with_ca {
            ensure!(
                ssl.is_some_and(|e| e["value"] == "/etc/ssl/cloud-ca.pem"),
                "{env:?}"
            );
            ensure!(
                mount.as_ref().is_some_and(
                    |m| m["mountPath"] == "/etc/ssl/cloud-ca.pem" && m["readOnly"] == true
                ),
                "{mount:?}"
            );
            ensure!(
                volume
                    .as_ref()
                    .is_some_and(|v| v["hostPath"]["path"] == "/etc/ssl/cloud-ca.pem"
                        && v["hostPath"]["type"] == "File"),
                "{volume:?}"
            );
        } else {
            ensure!(
                ssl.is_none() && mount.is_none() && volume.is_none(),
                "{spec}"
            );
        }
    }
    Ok(())
}

/// Not a check: brings everything up as the test above does and leaves it
/// running for a person to use (`scripts/local-up.sh --real`), until Ctrl-C
/// or `$AADPODID_REAL_KEEP_SECS` seconds (default 3600); then tears it down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "left running on purpose: scripts/local-up.sh --real"]
async fn real_cluster_stays_up() -> anyhow::Result<()> {
    let mut steps = Steps::new("real helm");
    let up = up(&mut steps).await?;
    let secs: u64 = std::env::var("AADPODID_REAL_KEEP_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3600);
    let kubectl = up.cluster.bin_dir().join("kubectl");
    let kubeconfig = up.cluster.kubeconfig().display().to_string();
    eprintln!("\nreal cluster up (two real nodes, the chart installed as release {RELEASE}):");
    eprintln!("  export KUBECONFIG={kubeconfig}");
    eprintln!("  {} get pods -A -o wide", kubectl.display());
    eprintln!("  helm: {}", helm::helm_bin()?.display());
    for (node, cloud) in up.nodes.iter().zip(&up.clouds) {
        eprintln!(
            "  node {}: pod logs {}, its namespace: ip netns exec {} iptables-save -t nat, \
             IMDS callers {}",
            node.name(),
            node.dir().join("pod-logs").display(),
            node.netns().name(),
            cloud.imds_peers().display()
        );
    }
    eprintln!(
        "  the app pod ({APP_NS}/app) asks for a token once a second; its log is under the \
         pod logs of its node"
    );
    eprintln!("left running for {secs} s; Ctrl-C tears it down");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => eprintln!("Ctrl-C: tearing down"),
        () = tokio::time::sleep(Duration::from_secs(secs)) => eprintln!("time is up: tearing down"),
    }
    drop(up);
    Ok(())
}

/// Builds (or reuses) the images, starts the cluster, the emulator and two
/// real nodes with the cloud inside them, installs the chart and waits
/// until mic's two replicas and both nmi pods are Ready (checking the
/// chart's securityContext on the running processes); applies the seed
/// manifests and the application pod and waits until the application has
/// its token and seed 004's pod its identity.
async fn up(steps: &mut Steps) -> anyhow::Result<Up> {
    let images = chart_images()?;
    steps.mark("images");
    let mut up = realhelm::start(steps, &[&images.mic, &images.nmi, &images.app]).await?;
    let mic = up.image("localhost/aad-pod-identity/mic:")?;
    let nmi = up.image("localhost/aad-pod-identity/nmi:")?;
    let sets = [
        ("image.repository", mic.repository.clone()),
        ("image.imagePullPolicy", "Never".into()),
        ("mic.tag", mic.tag.clone()),
        ("nmi.tag", nmi.tag.clone()),
        ("mic.cloudConfig", up.files.azure_json.display().to_string()),
        (
            "mic.customCloud.configPath",
            up.files.environment.display().to_string(),
        ),
        (
            "mic.customCloud.caBundlePath",
            up.ca.ca.display().to_string(),
        ),
        ("nmi.kubeletConfig", up.kubelet_config.display().to_string()),
    ];
    up.helm_chart(
        "install",
        &["--create-namespace"],
        &sets,
        &["mic.customCloud.enabled", "nmi.routeLocalnetInitContainer"],
    )?;
    steps.mark("helm install");

    up.wait_workloads().await?;
    steps.mark("mic 2/2 and nmi 2/2 Ready");
    // The chart's securityContext holds for the running processes: nmi runs
    // as root with only NET_ADMIN and NET_RAW, mic with no capability on a
    // read-only root, neither can gain privileges.
    for (program, caps, read_only) in [("nmi", 0x3000_u64, false), ("mic", 0, true)] {
        let seen = processes_of(&up.node_refs(), program);
        ensure!(seen.len() == 2, "{program}: {seen:?}");
        for p in &seen {
            ensure!(
                p.effective_caps == caps && p.no_new_privs && (!read_only || p.read_only_root),
                "{program}: {p:?}"
            );
        }
    }
    up.seed(steps).await?;
    Ok(up)
}

/// What the kernel says about one container process.
#[derive(Debug)]
#[allow(dead_code, reason = "pid is for the failure message")]
struct ProcessSecurity {
    pid: u32,
    effective_caps: u64,
    no_new_privs: bool,
    read_only_root: bool,
}

/// The processes in the nodes' pods whose program is `program` (its file
/// name), with their effective capabilities, `no_new_privs` and whether
/// their root is mounted read-only.
fn processes_of(nodes: &[&RealNode], program: &str) -> Vec<ProcessSecurity> {
    let mut out = Vec::new();
    for pid in nodes.iter().flat_map(|n| n.pod_processes()) {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let first = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        if Path::new(&*String::from_utf8_lossy(first)).file_name() != Some(program.as_ref()) {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_default()
                .to_string()
        };
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
        // mountinfo: the mount point is the 5th field, its options the 6th.
        let read_only_root = mounts.lines().any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.get(4) == Some(&"/") && f.get(5).is_some_and(|o| o.split(',').any(|x| x == "ro"))
        });
        out.push(ProcessSecurity {
            pid,
            effective_caps: u64::from_str_radix(&field("CapEff:"), 16).unwrap_or(u64::MAX),
            no_new_privs: field("NoNewPrivs:") == "1",
            read_only_root,
        });
    }
    out
}
