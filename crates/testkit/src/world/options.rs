//! What a world holds ([`Options`]) and how it starts mic and nmi
//! ([`Program`]).

use std::path::PathBuf;

use anyhow::Context as _;

/// How the world starts mic or nmi: an executable, and variables set on top
/// of the container's environment.
///
/// ```
/// use aadpodid_testkit::world::Program;
/// // A binary that is nmi by itself (a test's `env!("CARGO_BIN_EXE_e2e-nmi")`).
/// let nmi = Program::binary("/path/to/e2e-nmi");
/// // A tool that runs mic when started with `MY_TOOL_ROLE=mic`.
/// let mic = Program::role("/path/to/my-tool", "MY_TOOL_ROLE", "mic");
/// assert_eq!(mic.env, vec![("MY_TOOL_ROLE".to_string(), "mic".to_string())]);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Program {
    /// The executable.
    pub path: PathBuf,
    /// Variables added to the container's environment (they win over it).
    pub env: Vec<(String, String)>,
}

impl Program {
    /// A binary that is mic or nmi by itself.
    pub fn binary(path: impl Into<PathBuf>) -> Program {
        Program {
            path: path.into(),
            env: vec![],
        }
    }

    /// Executable `exe` run with `var=value`, which makes it act as mic or
    /// nmi (a tool that re-executes itself in a role).
    pub fn role(exe: impl Into<PathBuf>, var: &str, value: &str) -> Program {
        Program {
            path: exe.into(),
            env: vec![(var.into(), value.into())],
        }
    }

    /// [`Program::role`] of the running executable.
    pub fn this_executable_as(var: &str, value: &str) -> anyhow::Result<Program> {
        let exe = std::env::current_exe().context("find the running executable")?;
        Ok(Program::role(exe, var, value))
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
    /// How nmi is started on each node.
    pub nmi: Program,
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_a_binary_or_an_executable_in_a_role() {
        let bin = Program::binary("/bin/mic");
        assert_eq!(bin.path, PathBuf::from("/bin/mic"));
        assert!(bin.env.is_empty());
        let role = Program::role("/bin/tool", "ROLE", "nmi");
        assert_eq!(role.path, PathBuf::from("/bin/tool"));
        assert_eq!(role.env, vec![("ROLE".to_string(), "nmi".to_string())]);
        let me = Program::this_executable_as("ROLE", "mic").unwrap();
        assert_eq!(me.path, std::env::current_exe().unwrap());
        let opts = Options::new("/m", "/n");
        assert_eq!((opts.mic.path, opts.nmi.path), ("/m".into(), "/n".into()));
    }
}
