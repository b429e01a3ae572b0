//! What a world holds ([`Options`]) and how it starts mic and nmi
//! ([`Program`]).

use std::path::PathBuf;

use anyhow::Context as _;

/// How the world starts mic or nmi: an executable, arguments added after
/// the world's, variables set on top of the container's environment, and
/// whose command line it speaks ([`Dialect`]).
///
/// ```
/// use aadpodid_testkit::world::Program;
/// // A binary that is nmi by itself (a test's `env!("CARGO_BIN_EXE_e2e-nmi")`).
/// let nmi = Program::binary("/path/to/e2e-nmi");
/// // A tool that runs mic when started with `MY_TOOL_ROLE=mic`.
/// let mic = Program::role("/path/to/my-tool", "MY_TOOL_ROLE", "mic");
/// assert_eq!(mic.env, vec![("MY_TOOL_ROLE".to_string(), "mic".to_string())]);
/// // With two more flags after the world's.
/// let mic = mic.with_args(["--syncRetryDuration=1h", "--logtostderr"]);
/// assert_eq!(mic.args.len(), 2);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Program {
    /// The executable.
    pub path: PathBuf,
    /// Arguments added after the world's (they win where a flag is repeated).
    pub args: Vec<String>,
    /// Variables added to the container's environment (they win over it).
    pub env: Vec<(String, String)>,
    /// Whose command line the executable takes.
    pub dialect: Dialect,
}

/// Whose command line a [`Program`] takes; it matters only where the two
/// differ (with [`super::ArgsSource::Flags`]): upstream's nmi has no
/// `--kubeconfig` flag (client-go reads `KUBECONFIG`) and needs
/// `route_localnet` set on its node, which this project's nmi sets itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dialect {
    /// This project's mic and nmi.
    #[default]
    ThisProject,
    /// Upstream aad-pod-identity v1.8.17's Go mic and nmi.
    Upstream,
}

impl Program {
    /// A binary that is mic or nmi by itself.
    pub fn binary(path: impl Into<PathBuf>) -> Program {
        Program {
            path: path.into(),
            args: vec![],
            env: vec![],
            dialect: Dialect::ThisProject,
        }
    }

    /// Executable `exe` run with `var=value`, which makes it act as mic or
    /// nmi (a tool that re-executes itself in a role).
    pub fn role(exe: impl Into<PathBuf>, var: &str, value: &str) -> Program {
        Program {
            env: vec![(var.into(), value.into())],
            ..Program::binary(exe)
        }
    }

    /// [`Program::role`] of the running executable.
    pub fn this_executable_as(var: &str, value: &str) -> anyhow::Result<Program> {
        let exe = std::env::current_exe().context("find the running executable")?;
        Ok(Program::role(exe, var, value))
    }

    /// Upstream v1.8.17's `mic` or `nmi` (`name`), built on first use
    /// ([`crate::upstream::upstream_bin_dir`]), logging to stderr.
    pub fn upstream(name: &str) -> anyhow::Result<Program> {
        Ok(Program {
            args: vec!["--logtostderr".into()],
            dialect: Dialect::Upstream,
            ..Program::binary(crate::upstream::upstream_bin_dir()?.join(name))
        })
    }

    /// The same program with `args` added after its own.
    pub fn with_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Program {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// What a world holds.
#[derive(Clone, Debug)]
pub struct Options {
    /// Number of scale sets.
    pub scale_sets: usize,
    /// Instances (nodes) per scale set.
    pub instances: usize,
    /// User-assigned identities `id-0..`, each with a binding `sel-<j>`.
    pub identities: usize,
    /// More user-assigned identities in the tenant, `id-<identities>..`,
    /// without chart objects (for identities the tests' users declare).
    pub unbound_identities: usize,
    /// Pod namespaces per node.
    pub pods_per_node: u8,
    /// Also an AzureIdentity + binding (`sel-invalid`) naming an identity the
    /// tenant does not have.
    pub invalid_identity: bool,
    /// Also [`super::ADDON`] on every scale set from the start (a
    /// pre-existing identity mic did not add).
    pub addon_identity: bool,
    /// Extra `--set key=value` for the chart.
    pub set: Vec<(String, String)>,
    /// Virtual seconds per real second of the emulator (a VMSS write takes 45
    /// virtual seconds).
    pub clock_speed: f64,
    /// How mic replicas are started.
    pub mic: Program,
    /// With [`super::ArgsSource::Flags`]: the namespace of mic's leader
    /// election and its `MIC_POD_NAMESPACE` (`default`; the chart sets its
    /// own).
    pub mic_namespace: String,
    /// How nmi is started on each node.
    pub nmi: Program,
    /// What carries the apiserver and IMDS into each node namespace (and
    /// the apiserver, ARM and Entra ID into each mic replica's): `None`
    /// for the kit's Python relay; a program taking the same arguments
    /// (`<listen address>=<unix socket path>` each) and printing `READY` once
    /// it listens (a tool's own relay, so that its figures do not depend on
    /// Python's).
    pub relay: Option<Program>,
    /// mic and nmi (from the chart) authenticate with a token of their
    /// ServiceAccount bound to their pod, as the kubelet mounts (the API
    /// server then names the pod's node in their requests), instead of one
    /// token of the ServiceAccount for every replica.
    pub pod_bound_tokens: bool,
}

impl Options {
    /// Two scale sets of two instances, five identities, two pod namespaces
    /// per node, the chart's default values, the clock 30 times real time;
    /// mic and nmi are these executables (a test passes
    /// `env!("CARGO_BIN_EXE_e2e-mic")` and `env!("CARGO_BIN_EXE_e2e-nmi")`).
    pub fn new(mic_bin: impl Into<PathBuf>, nmi_bin: impl Into<PathBuf>) -> Self {
        Options::with_programs(Program::binary(mic_bin), Program::binary(nmi_bin))
    }

    /// [`Options::new`] with mic and nmi started as `mic` and `nmi` say (for
    /// example one executable re-executed in two roles, [`Program::role`]).
    pub fn with_programs(mic: Program, nmi: Program) -> Self {
        Options {
            mic,
            nmi,
            scale_sets: 2,
            instances: 2,
            identities: 5,
            unbound_identities: 0,
            pods_per_node: 2,
            invalid_identity: false,
            addon_identity: false,
            set: vec![],
            clock_speed: 30.0,
            relay: None,
            pod_bound_tokens: false,
            mic_namespace: super::LEASE.0.into(),
        }
    }
}

impl Options {
    /// Adds chart values (`--set key=value`), after those already there.
    pub fn set_values(&mut self, values: &[(&str, &str)]) {
        self.set
            .extend(values.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_a_binary_or_an_executable_in_a_role() {
        let bin = Program::binary("/bin/mic");
        assert_eq!(bin.path, PathBuf::from("/bin/mic"));
        assert!(bin.env.is_empty() && bin.args.is_empty());
        assert_eq!(bin.dialect, Dialect::ThisProject);
        let role = Program::role("/bin/tool", "ROLE", "nmi");
        assert_eq!(role.path, PathBuf::from("/bin/tool"));
        assert_eq!(role.env, vec![("ROLE".to_string(), "nmi".to_string())]);
        let more = role.clone().with_args(["--a"]).with_args(["--b"]);
        assert_eq!(more.args, ["--a", "--b"]);
        assert_eq!((more.path, more.env), (role.path, role.env));
        let me = Program::this_executable_as("ROLE", "mic").unwrap();
        assert_eq!(me.path, std::env::current_exe().unwrap());
        let mut opts = Options::new("/m", "/n");
        opts.set_values(&[("a", "1"), ("b.c", "x")]);
        assert_eq!(
            opts.set,
            [("a".into(), "1".into()), ("b.c".into(), "x".into())]
        );
        assert_eq!((opts.mic.path, opts.nmi.path), ("/m".into(), "/n".into()));
    }
}
