//! The container images, built for real by `scripts/images.sh`
//! (Debian-made bases, the release binaries of this checkout, `podman
//! build`; reused from its cache when nothing changed), then run as a
//! container runtime would: each image's OCI archive is unpacked into an OCI
//! bundle (its layers in order as the root filesystem, its user, entry point
//! and environment in `config.json`) and run with `runc`, with the chart's
//! security settings.
//!
//! - mic runs `--version` as its image's non-root user (65532) on a
//!   read-only root with no capabilities; the image has no shell.
//! - nmi's entry point picks the iptables back end the node's rules are in
//!   and nmi then uses it: each case sets up rules in a network namespace
//!   the test creates (never the root namespace's iptables), runs the image
//!   there with `--cleanup-iptables`, and checks which back end's
//!   `aad-metadata` chain nmi removed.
//! - The chart's route_localnet init container works with the nmi image
//!   (privileged), and NMI's own container cannot write /proc/sys.
//! - The application image (the real Python Azure SDK and `/app/token.py`)
//!   gets a token from the Azure emulator's IMDS at 169.254.169.254 inside a
//!   test namespace, for the identity assigned to that VM only.
//! - Upstream v1.8.17's mic and nmi images run `--version`, and upstream
//!   nmi's `iptables` follows the node's back end.
//!
//! Needs root, runc and podman (the script installs them with apt-get when
//! missing). Every container runs under `timeout`; bundles, containers and
//! namespaces are removed when their guards drop, and those of a test
//! process that died by the next one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use aadpodid_tests::netns::{IMDS_ADDRESS, NetNs};
use aadpodid_tests::upstream::UPSTREAM_VERSION;
use aadpodid_tests::{SUB, TENANT};
use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};

/// How long one container may run.
const RUN_LIMIT_S: &str = "30";

/// Images `scripts/images.sh` builds together, by the names it takes
/// (`aadpodid_tests::realhelm::build_images`, bounded at 40 minutes: a cold
/// run makes the bases from Debian packages and builds both release
/// binaries):
/// built (or reused from its cache) once per test process; the script's own
/// lock serialises concurrent processes.
struct Images {
    names: &'static [&'static str],
    built: OnceLock<Result<Vec<(String, PathBuf)>, String>>,
}

/// This checkout's mic and nmi (a release build of both when not cached).
static OURS: Images = Images::new(&["mic", "nmi"]);
/// The application image (no cargo).
static APP: Images = Images::new(&["app"]);
/// Upstream v1.8.17's mic and nmi (tests/upstream/build.sh when not cached).
static UPSTREAM: Images = Images::new(&["upstream-mic", "upstream-nmi"]);

impl Images {
    const fn new(names: &'static [&'static str]) -> Self {
        Images {
            names,
            built: OnceLock::new(),
        }
    }

    /// The archive of image `name`, one of [`Images::names`].
    fn archive(&self, name: &str) -> anyhow::Result<&Path> {
        let built = self
            .built
            .get_or_init(|| {
                aadpodid_tests::realhelm::build_images(self.names).map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| anyhow::anyhow!("scripts/images.sh {:?}: {e}", self.names))?;
        built
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, path)| path.as_path())
            .with_context(|| format!("{name} is not one of {:?}", self.names))
    }
}

/// An OCI bundle unpacked from an image archive, with a `runc` container ID;
/// the container and the folder are removed on drop.
struct Bundle {
    dir: PathBuf,
    id: String,
    /// The image's config (`User`, `Entrypoint`, `Env`, ...).
    image: Value,
}

/// A JSON file of the unpacked archive's blobs.
fn blob(oci: &Path, digest: &str) -> anyhow::Result<PathBuf> {
    let (alg, hex) = digest
        .split_once(':')
        .with_context(|| format!("digest {digest}"))?;
    Ok(oci.join("blobs").join(alg).join(hex))
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    Ok(serde_json::from_slice(&text)?)
}

/// Runs `program args`; an error with its stderr when it fails.
fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {args:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Bundle {
    /// Unpacks `archive` (an `oci-archive` of one image) into a new bundle:
    /// the layers in order into `rootfs`, and `runc spec`'s default config.
    fn unpack(archive: &Path, role: &str) -> anyhow::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        static STALE: std::sync::Once = std::sync::Once::new();
        STALE.call_once(remove_stale);
        let pid = std::process::id();
        let id = format!(
            "aadpodid-images-{pid}-{}-{role}",
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = bundles_root().join(pid.to_string()).join(&id);
        let mut bundle = Bundle {
            dir,
            id,
            image: Value::Null,
        };
        let oci = bundle.dir.join("oci");
        let rootfs = bundle.dir.join("rootfs");
        std::fs::create_dir_all(&oci)?;
        std::fs::create_dir_all(&rootfs)?;
        run("tar", &["-xf", path_str(archive)?, "-C", path_str(&oci)?])?;
        let index = read_json(&oci.join("index.json"))?;
        let manifests = index["manifests"].as_array().context("index.json")?;
        ensure!(manifests.len() == 1, "one image per archive: {index}");
        let manifest = read_json(&blob(
            &oci,
            manifests[0]["digest"].as_str().context("digest")?,
        )?)?;
        for layer in manifest["layers"].as_array().context("layers")? {
            let path = blob(&oci, layer["digest"].as_str().context("digest")?)?;
            let listing = run("tar", &["-tf", path_str(&path)?])?;
            // Whiteouts (files deleted by a later layer) are not applied here;
            // the images are built without deleting anything of their base.
            if let Some(w) = listing.lines().find(|l| l.contains(".wh.")) {
                bail!("layer {} has a whiteout ({w}): not handled", path.display());
            }
            run(
                "tar",
                &[
                    "--numeric-owner",
                    "-xf",
                    path_str(&path)?,
                    "-C",
                    path_str(&rootfs)?,
                ],
            )?;
        }
        let config = read_json(&blob(
            &oci,
            manifest["config"]["digest"].as_str().context("digest")?,
        )?)?;
        bundle.image = config["config"].clone();
        std::fs::remove_dir_all(&oci)?;
        run("runc", &["spec", "--bundle", path_str(&bundle.dir)?])?;
        Ok(bundle)
    }

    /// The image's `User` as numeric `(uid, gid)` (root when empty).
    fn user(&self) -> anyhow::Result<(u32, u32)> {
        let user = self.image["User"].as_str().unwrap_or("");
        if user.is_empty() {
            return Ok((0, 0));
        }
        let (u, g) = user.split_once(':').unwrap_or((user, user));
        Ok((
            u.parse().with_context(|| format!("numeric user: {user}"))?,
            g.parse()
                .with_context(|| format!("numeric group: {user}"))?,
        ))
    }

    /// Writes `config.json` for a run of the image's entry point with
    /// `args` (or of `command` instead of the entry point), extra `env`,
    /// the image's user (or `user`), a read-only root (unless `writable_root`) with a
    /// tmpfs on /run and /tmp,
    /// only `caps`, no privilege escalation, in the network namespace
    /// `netns` when given. `privileged` is the chart's init container: every
    /// capability held here ([`held_caps`]) and a writable /proc/sys.
    fn configure(&self, run: &Run<'_>) -> anyhow::Result<()> {
        let path = self.dir.join("config.json");
        let mut config = read_json(&path)?;
        let mut argv: Vec<String> = match run.command {
            Some(command) => command.iter().map(|s| s.to_string()).collect(),
            None => self.image["Entrypoint"]
                .as_array()
                .context("Entrypoint")?
                .iter()
                .map(|v| v.as_str().map(str::to_owned).context("Entrypoint"))
                .collect::<anyhow::Result<_>>()?,
        };
        argv.extend(run.args.iter().map(|s| s.to_string()));
        let mut env: Vec<String> = self.image["Env"]
            .as_array()
            .map(|e| {
                e.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        env.extend(run.env.iter().map(|s| s.to_string()));
        let (uid, gid) = match run.user {
            Some(user) => user,
            None => self.user()?,
        };
        let caps: Vec<&str> = if run.privileged {
            held_caps()?
        } else {
            run.caps.to_vec()
        };
        let process = &mut config["process"];
        process["terminal"] = json!(false);
        process["args"] = json!(argv);
        process["env"] = json!(env);
        process["user"] = json!({ "uid": uid, "gid": gid });
        process["noNewPrivileges"] = json!(!run.privileged);
        process["capabilities"] = json!({
            "bounding": caps, "effective": caps, "permitted": caps,
        });
        config["root"]["readonly"] = json!(!run.writable_root);
        let mounts = config["mounts"].as_array_mut().context("mounts")?;
        for dest in ["/run", "/tmp"] {
            mounts.push(json!({
                "destination": dest, "type": "tmpfs", "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=1777"],
            }));
        }
        let linux = &mut config["linux"];
        if run.privileged {
            linux["readonlyPaths"] = json!([]);
            linux["maskedPaths"] = json!([]);
        }
        if let Some(ns) = run.netns {
            let namespaces = linux["namespaces"].as_array_mut().context("namespaces")?;
            for n in namespaces.iter_mut() {
                if n["type"] == "network" {
                    n["path"] = json!(format!("/run/netns/{}", ns.name()));
                }
            }
        }
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
        Ok(())
    }

    /// Runs the container to completion (at most [`RUN_LIMIT_S`]).
    fn run(&self, run: &Run<'_>) -> anyhow::Result<Output> {
        self.configure(run)?;
        let out = Command::new("timeout")
            .args(["-k", "5", RUN_LIMIT_S, "runc", "run", "--bundle"])
            .arg(&self.dir)
            .arg(&self.id)
            .stdin(Stdio::null())
            .output()
            .context("runc run")?;
        runc_delete(&self.id);
        Ok(out)
    }
}

impl Bundle {
    /// Runs `command` (default: the entry point) with `args` as the chart
    /// runs NMI's container: root, NET_ADMIN and NET_RAW only, in `ns`.
    fn run_as_nmi(
        &self,
        ns: &NetNs,
        command: Option<&[&str]>,
        args: &[&str],
    ) -> anyhow::Result<Output> {
        self.run(&Run {
            command,
            args,
            caps: NMI_CAPS,
            netns: Some(ns),
            ..Run::default()
        })
    }
}

/// A run's (stdout, stderr) when it exited 0; an error with both otherwise.
fn succeeded(out: Output) -> anyhow::Result<(String, String)> {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    ensure!(out.status.success(), "{}: {stdout}{stderr}", out.status);
    Ok((stdout, stderr))
}

/// Stops and removes the container `id`, if there is one.
fn runc_delete(id: &str) {
    let _ = Command::new("runc")
        .args(["delete", "--force", id])
        .stderr(Stdio::null())
        .status();
}

/// The folder of every test process's bundles: `<tmp>/aadpodid-images`,
/// with one folder per process ID in it.
fn bundles_root() -> PathBuf {
    std::env::temp_dir().join("aadpodid-images")
}

/// Removes the bundles, and their containers, of test processes that no
/// longer run.
fn remove_stale() {
    let dead = std::fs::read_dir(bundles_root())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
                .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        });
    for process in dead {
        for bundle in std::fs::read_dir(process.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            runc_delete(&bundle.file_name().to_string_lossy());
        }
        let _ = std::fs::remove_dir_all(process.path());
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        runc_delete(&self.id);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("non-UTF-8 path {}", p.display()))
}

/// One container run.
#[derive(Default)]
struct Run<'a> {
    command: Option<&'a [&'a str]>,
    args: &'a [&'a str],
    env: &'a [&'a str],
    caps: &'a [&'a str],
    netns: Option<&'a NetNs>,
    privileged: bool,
    /// A writable root filesystem (the default is read-only).
    writable_root: bool,
    /// `(uid, gid)` instead of the image's user (a pod's `runAsUser`).
    user: Option<(u32, u32)>,
}

/// The capabilities the chart gives NMI's container (every other is dropped).
const NMI_CAPS: &[&str] = &["CAP_NET_ADMIN", "CAP_NET_RAW"];

/// The capabilities up to CAP_SETFCAP, in bit order.
const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
];

/// Every capability of [`ALL_CAPS`] this process holds: a privileged
/// container gets every capability of the runtime, and a runtime cannot
/// grant one it lacks (machines without CAP_SYS_RESOURCE exist).
fn held_caps() -> anyhow::Result<Vec<&'static str>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("CapEff in /proc/self/status")?;
    let held = u64::from_str_radix(hex.trim(), 16)?;
    Ok(ALL_CAPS
        .iter()
        .enumerate()
        .filter(|(bit, _)| held & (1 << bit) != 0)
        .map(|(_, cap)| *cap)
        .collect())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn mic_image_runs_version_as_non_root() -> anyhow::Result<()> {
    let bundle = Bundle::unpack(OURS.archive("mic")?, "mic")?;
    let (uid, gid) = bundle.user()?;
    assert_eq!((uid, gid), (65532, 65532), "{}", bundle.image);
    let rootfs = bundle.dir.join("rootfs");
    assert!(!rootfs.join("bin/sh").exists(), "the mic image has a shell");
    assert!(
        std::fs::metadata(rootfs.join("etc/ssl/certs/ca-certificates.crt"))?.len() > 100_000,
        "CA bundle"
    );
    // Upstream's MIC checks MIC_POD_NAMESPACE before --version.
    let out = bundle.run(&Run {
        args: &["--version"],
        env: &["MIC_POD_NAMESPACE=default"],
        ..Run::default()
    })?;
    let (stdout, _) = succeeded(out)?;
    assert_eq!(stdout.trim(), env!("CARGO_PKG_VERSION"));
    Ok(())
}

/// The rules a case puts in its namespace before nmi runs.
#[derive(Clone, Copy, Debug)]
enum Setup {
    /// kubelet's hint chain in mangle and nmi's chain in nat, legacy.
    LegacyKubelet,
    /// The same with nft.
    NftKubelet,
    /// No kubelet chains; nmi's chain and two rules in legacy only.
    LegacyRulesOnly,
    /// kubelet's hint in nft with nmi's chain, and more rules in legacy:
    /// the hint decides.
    NftKubeletMoreLegacyRules,
    /// Nothing at all.
    Nothing,
}

fn iptables(ns: &NetNs, backend: &str, args: &[&str]) -> anyhow::Result<()> {
    ns.run(&format!("iptables-{backend}"), args).map(drop)
}

/// nmi's chain, jumped to from PREROUTING, with one rule.
fn add_nmi_chain(ns: &NetNs, backend: &str) -> anyhow::Result<()> {
    iptables(ns, backend, &["-t", "nat", "-N", "aad-metadata"])?;
    iptables(
        ns,
        backend,
        &["-t", "nat", "-A", "aad-metadata", "-j", "RETURN"],
    )?;
    iptables(
        ns,
        backend,
        &["-t", "nat", "-A", "PREROUTING", "-j", "aad-metadata"],
    )
}

fn add_hint(ns: &NetNs, backend: &str) -> anyhow::Result<()> {
    iptables(ns, backend, &["-t", "mangle", "-N", "KUBE-IPTABLES-HINT"])
}

fn has_nmi_chain(ns: &NetNs, backend: &str) -> anyhow::Result<bool> {
    let save = ns.run(&format!("iptables-{backend}-save"), &[])?;
    Ok(save.lines().any(|l| l.starts_with(":aad-metadata ")))
}

#[test]
fn nmi_image_uses_the_nodes_iptables_back_end() -> anyhow::Result<()> {
    let bundle = Bundle::unpack(OURS.archive("nmi")?, "nmi")?;
    assert_eq!(bundle.user()?, (0, 0));
    // (setup, the back end the entry point must pick, whether the other back
    // end keeps an nmi chain the case put there).
    let cases = [
        (Setup::LegacyKubelet, "legacy", false),
        (Setup::NftKubelet, "nft", false),
        (Setup::LegacyRulesOnly, "legacy", false),
        (Setup::NftKubeletMoreLegacyRules, "nft", true),
        (Setup::Nothing, "nft", false),
    ];
    for (setup, want, other_kept) in cases {
        let ns = NetNs::new("images")?;
        match setup {
            Setup::LegacyKubelet | Setup::NftKubelet => {
                let b = if matches!(setup, Setup::LegacyKubelet) {
                    "legacy"
                } else {
                    "nft"
                };
                add_hint(&ns, b)?;
                add_nmi_chain(&ns, b)?;
            }
            Setup::LegacyRulesOnly => add_nmi_chain(&ns, "legacy")?,
            Setup::NftKubeletMoreLegacyRules => {
                add_hint(&ns, "nft")?;
                add_nmi_chain(&ns, "nft")?;
                add_nmi_chain(&ns, "legacy")?;
                iptables(
                    &ns,
                    "legacy",
                    &["-t", "filter", "-A", "INPUT", "-j", "ACCEPT"],
                )?;
            }
            Setup::Nothing => {}
        }
        let (_, stderr) = succeeded(bundle.run_as_nmi(&ns, None, &["--cleanup-iptables"])?)
            .with_context(|| format!("{setup:?}"))?;
        let said = format!("nmi-entrypoint: iptables back end {want} (");
        assert!(stderr.contains(&said), "{setup:?}: want {want}: {stderr}");
        assert!(
            stderr.contains("iptables chain and jump removed"),
            "{setup:?}: {stderr}"
        );
        assert!(
            !has_nmi_chain(&ns, want)?,
            "{setup:?}: chain left in {want}"
        );
        let other = if want == "nft" { "legacy" } else { "nft" };
        assert_eq!(has_nmi_chain(&ns, other)?, other_kept, "{setup:?}: {other}");
    }

    // An explicit --iptables-path wins over the detection.
    let ns = NetNs::new("images")?;
    add_hint(&ns, "nft")?;
    add_nmi_chain(&ns, "legacy")?;
    let explicit = [
        "--iptables-path=/usr/sbin/iptables-legacy",
        "--cleanup-iptables",
    ];
    let (_, stderr) = succeeded(bundle.run_as_nmi(&ns, None, &explicit)?)?;
    assert!(!stderr.contains("nmi-entrypoint"), "{stderr}");
    assert!(!has_nmi_chain(&ns, "legacy")?);

    // So does AADPODID_IPTABLES_MODE.
    add_nmi_chain(&ns, "legacy")?;
    let (_, stderr) = succeeded(bundle.run(&Run {
        args: &["--cleanup-iptables"],
        env: &["AADPODID_IPTABLES_MODE=legacy"],
        caps: NMI_CAPS,
        netns: Some(&ns),
        ..Run::default()
    })?)?;
    assert!(
        stderr.contains("iptables back end legacy (set by AADPODID_IPTABLES_MODE)"),
        "{stderr}"
    );
    assert!(!has_nmi_chain(&ns, "legacy")?);

    // The conntrack tool --enable-conntrack-deletion runs is in the image.
    let (stdout, _) = succeeded(bundle.run_as_nmi(&ns, Some(&["conntrack", "--version"]), &[])?)?;
    assert!(stdout.contains("conntrack"), "{stdout}");
    Ok(())
}

#[test]
fn nmi_image_route_localnet_needs_the_privileged_init_container() -> anyhow::Result<()> {
    let bundle = Bundle::unpack(OURS.archive("nmi")?, "localnet")?;
    let ns = NetNs::new("images")?;
    let value = || -> anyhow::Result<String> {
        Ok(ns
            .run("cat", &["/proc/sys/net/ipv4/conf/all/route_localnet"])?
            .trim()
            .to_string())
    };
    assert_eq!(value()?, "0");
    // The chart's init container command, as NMI's own container (root,
    // NET_ADMIN and NET_RAW only): /proc/sys is read-only there.
    let write: &[&str] = &[
        "/bin/sh",
        "-c",
        "echo 1 > /proc/sys/net/ipv4/conf/all/route_localnet",
    ];
    let out = bundle.run_as_nmi(&ns, Some(write), &[])?;
    assert!(
        !out.status.success(),
        "route_localnet written without privilege"
    );
    assert_eq!(value()?, "0");
    // As the init container (privileged): set for the node's namespace.
    succeeded(bundle.run(&Run {
        command: Some(write),
        netns: Some(&ns),
        privileged: true,
        ..Run::default()
    })?)?;
    assert_eq!(value()?, "1");
    Ok(())
}

/// The emulator's identities: `app-id` is assigned to the VM `app-vm`,
/// `other-id` exists but is on no machine.
const APP_CLIENT: &str = "c0000000-0000-4000-8000-0000000000a1";
const OTHER_CLIENT: &str = "c0000000-0000-4000-8000-0000000000a2";
const APP_MACHINE: &str = "vm/app-vm";
const ARM_SCOPE: &str = "https://management.azure.com/.default";

fn app_emulator_config() -> anyhow::Result<azure_emulator::Config> {
    let yaml = format!(
        "tenantId: {TENANT}
subscriptionId: {SUB}
identities:
  - {{ name: app-id, resourceGroup: app-rg, clientId: {APP_CLIENT} }}
  - {{ name: other-id, resourceGroup: app-rg, clientId: {OTHER_CLIENT} }}
virtualMachines:
  - {{ name: app-vm, resourceGroup: app-rg, identity: {{ userAssigned: [app-id] }} }}
"
    );
    Ok(azure_emulator::Config::from_yaml(&yaml)?)
}

/// The JSON lines a run of `/app/token.py` printed, and whether it exited 0.
fn token_lines(out: &Output) -> anyhow::Result<(bool, Vec<Value>)> {
    let stdout = text(&out.stdout);
    let lines = stdout
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
        .collect::<anyhow::Result<Vec<Value>>>()
        .with_context(|| format!("stderr: {}", text(&out.stderr)))?;
    Ok((out.status.success(), lines))
}

/// `sha256sum` of `data`, in hex.
fn sha256_hex(data: &str) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("run sha256sum")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(data.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "sha256sum: {}", out.status);
    Ok(text(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// The application image, as an application pod runs it (its non-root
/// user, a read-only root, no capabilities), in a network namespace where
/// 169.254.169.254 is the emulator's IMDS for the VM `app-vm`: the real
/// Python SDK gets a token for the identity assigned to that VM (verified by
/// the emulator), and a clear failure for one that is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_image_gets_a_token_through_imds() -> anyhow::Result<()> {
    let archive = tokio::task::block_in_place(|| APP.archive("app"))?;
    let bundle = Bundle::unpack(archive, "app")?;
    assert_eq!(bundle.user()?, (65532, 65532), "{}", bundle.image);
    let rootfs = bundle.dir.join("rootfs");
    assert!(!rootfs.join("bin/sh").exists(), "the app image has a shell");

    let emu = azure_emulator::Emulator::start(app_emulator_config()?).await?;
    let imds = emu.add_imds(APP_MACHINE, "127.0.0.1:0".parse()?).await?;
    let ns = NetNs::new("images-app")?;
    ns.add_local_address(IMDS_ADDRESS)?;
    // Dies with this thread if the test fails before the end.
    let mut relay = ns
        .relay_to(SocketAddr::from((IMDS_ADDRESS, 80)), imds, &bundle.dir)
        .await?;
    let token_py = |args: &[&str]| -> anyhow::Result<Output> {
        let mut command = vec!["python3", "/app/token.py"];
        command.extend(args);
        tokio::task::block_in_place(|| {
            bundle.run(&Run {
                command: Some(&command),
                netns: Some(&ns),
                ..Run::default()
            })
        })
    };

    // The identity assigned to the VM: a token the emulator issued for it.
    let out = token_py(&[ARM_SCOPE, APP_CLIENT, "--show-token"])?;
    let (ok, lines) = token_lines(&out)?;
    assert!(ok, "{lines:?} {}", text(&out.stderr));
    let [line] = &lines[..] else {
        bail!("one line per try: {lines:?}");
    };
    assert_eq!(line["ok"], true, "{line}");
    let token = line["token"].as_str().context("token")?;
    let claims = emu
        .verify_token(token)
        .map_err(|e| anyhow::anyhow!("the emulator rejects the token: {e:?}"))?;
    assert_eq!(claims.appid, APP_CLIENT);
    assert_eq!(line["appid"], APP_CLIENT, "{line}");
    assert_eq!(line["token_sha256"], sha256_hex(token)?, "{line}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let expires_on = line["expires_on"].as_u64().context("expires_on")?;
    assert!(expires_on > now.as_secs(), "{line}");

    // Bounded repetition: one line per try, no token printed by default.
    let (ok, lines) = token_lines(&token_py(&[
        ARM_SCOPE,
        APP_CLIENT,
        "--loop",
        "2",
        "--interval",
        "0",
    ])?)?;
    assert!(ok, "{lines:?}");
    let tries: Vec<_> = lines
        .iter()
        .map(|l| (l["ok"].clone(), l["try"].clone()))
        .collect();
    assert_eq!(tries, [(json!(true), json!(1)), (json!(true), json!(2))]);
    assert!(lines.iter().all(|l| l.get("token").is_none()), "{lines:?}");

    // An identity that is not assigned to the VM: IMDS's error, exit 1.
    let out = token_py(&[ARM_SCOPE, OTHER_CLIENT])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let (_, lines) = token_lines(&out)?;
    let [line] = &lines[..] else {
        bail!("one line per try: {lines:?}");
    };
    assert_eq!(line["ok"], false, "{line}");
    assert!(line.get("token_sha256").is_none(), "{line}");
    let error = line["error"].as_str().context("error")?;
    assert!(error.contains("Identity not found"), "{line}");
    relay.kill()?;
    relay.wait()?;
    emu.shutdown();
    Ok(())
}

#[test]
fn upstream_images_run_version() -> anyhow::Result<()> {
    let mic = Bundle::unpack(UPSTREAM.archive("upstream-mic")?, "upstream-mic")?;
    assert_eq!(mic.user()?, (65532, 65532), "{}", mic.image);
    assert_eq!(mic.image["Entrypoint"], json!(["mic"]), "{}", mic.image);
    let nmi = Bundle::unpack(UPSTREAM.archive("upstream-nmi")?, "upstream-nmi")?;
    assert_eq!(nmi.user()?, (10001, 10001), "{}", nmi.image);
    assert_eq!(nmi.image["Entrypoint"], json!(["nmi"]), "{}", nmi.image);
    let want = format!("MIC Version: {UPSTREAM_VERSION} - NMI Version: {UPSTREAM_VERSION}");
    // Upstream's MIC checks MIC_POD_NAMESPACE before --version.
    let (stdout, _) = succeeded(mic.run(&Run {
        args: &["--version"],
        env: &["MIC_POD_NAMESPACE=default"],
        ..Run::default()
    })?)?;
    assert!(stdout.starts_with(&want), "{stdout}");
    let (stdout, _) = succeeded(nmi.run(&Run {
        args: &["--version"],
        ..Run::default()
    })?)?;
    assert!(stdout.starts_with(&want), "{stdout}");
    Ok(())
}

/// Upstream's nmi runs `iptables` from PATH: in its image that is the
/// wrapper, which finds the node's back end (kubelet's hint, in legacy or
/// in nft with more rules in legacy) and, with a writable root as upstream's
/// chart runs it, points the Debian alternatives at it; with a read-only
/// root it says so and runs that back end's command directly.
#[test]
fn upstream_nmi_image_iptables_follows_the_nodes_back_end() -> anyhow::Result<()> {
    let archive = UPSTREAM.archive("upstream-nmi")?;
    for backend in ["legacy", "nft"] {
        // A new bundle for each case: the writable run changes its root.
        let nmi = Bundle::unpack(archive, "upstream-nmi")?;
        let ns = NetNs::new("images")?;
        add_hint(&ns, backend)?;
        add_nmi_chain(&ns, backend)?;
        if backend == "nft" {
            // More rules in legacy: the hint still decides.
            add_nmi_chain(&ns, "legacy")?;
            iptables(&ns, "legacy", &["-A", "INPUT", "-j", "ACCEPT"])?;
        }
        // Upstream's chart: root (runAsUser 0), these capabilities only.
        let caps = &["CAP_DAC_READ_SEARCH", "CAP_NET_ADMIN", "CAP_NET_RAW"];
        let run = |writable_root| {
            succeeded(nmi.run(&Run {
                command: Some(&["iptables", "-t", "mangle", "-S"]),
                caps,
                netns: Some(&ns),
                writable_root,
                user: Some((0, 0)),
                ..Run::default()
            })?)
        };
        // The hint is in the chosen back end's mangle table only.
        let (stdout, stderr) = run(false)?;
        assert!(
            stdout.contains("-N KUBE-IPTABLES-HINT"),
            "{backend}: {stdout}"
        );
        assert!(
            stderr.contains("Unable to redirect iptables binaries"),
            "{backend}: {stderr}"
        );
        let alternative = nmi.dir.join("rootfs/etc/alternatives/iptables");
        assert_eq!(
            std::fs::read_link(&alternative)?,
            Path::new("/usr/sbin/iptables-wrapper")
        );
        let (stdout, stderr) = run(true)?;
        assert!(
            stdout.contains("-N KUBE-IPTABLES-HINT"),
            "{backend}: {stdout}"
        );
        assert!(
            !stderr.contains("Unable to redirect"),
            "{backend}: {stderr}"
        );
        assert_eq!(
            std::fs::read_link(&alternative)?,
            PathBuf::from(format!("/usr/sbin/iptables-{backend}"))
        );
    }
    Ok(())
}
