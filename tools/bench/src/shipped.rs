//! The shipped `mic` and `nmi`: the release binaries, built as their images
//! build them (`cargo build --release --locked -p <crate> --bin <crate>`,
//! one crate at a time, as `Dockerfile.mic` and `Dockerfile.nmi` do), and
//! where the benchmark's processes run (nmi pinned to one core, the load
//! generator to another).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use aadpodid_testkit::unique_name;
use aadpodid_testkit::world::Program;
use anyhow::{Context as _, bail};

/// The release `mic` and `nmi` this run measures.
#[derive(Clone, Debug)]
pub struct Shipped {
    pub mic: PathBuf,
    pub nmi: PathBuf,
    /// Cores of the run: nmi on one, the load generator on another.
    pub cores: Cores,
    /// Folder of the launch scripts (removed with the run).
    dir: PathBuf,
}

/// Which core nmi and the load generator are pinned to; `None` where the
/// machine has a single core (nothing is pinned then).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cores {
    pub load: Option<usize>,
    pub nmi: Option<usize>,
}

impl Cores {
    /// Core 0 for the load generator and core 1 for nmi on a machine of at
    /// least two cores this process may run on.
    pub fn of_machine() -> Cores {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        if n >= 2 {
            Cores {
                load: Some(0),
                nmi: Some(1),
            }
        } else {
            Cores {
                load: None,
                nmi: None,
            }
        }
    }

    /// How the report says it.
    pub fn describe(&self) -> String {
        match (self.load, self.nmi) {
            (Some(l), Some(n)) => format!(
                "nmi pinned to core {n} and the load generator to core {l} (taskset); mic, the emulator, etcd and the apiserver unpinned, except during row 3's load runs, when they run on core {l} too"
            ),
            _ => "nothing pinned (a single core)".into(),
        }
    }
}

impl Shipped {
    /// `mic` and `nmi` given on the command line, or built here in release
    /// mode; either way checked to be executables.
    pub fn locate(mic: Option<&Path>, nmi: Option<&Path>) -> anyhow::Result<Shipped> {
        let mic = match mic {
            Some(p) => p.to_path_buf(),
            None => build_release("mic")?,
        };
        let nmi = match nmi {
            Some(p) => p.to_path_buf(),
            None => build_release("nmi")?,
        };
        for p in [&mic, &nmi] {
            let meta = std::fs::metadata(p).with_context(|| format!("{}", p.display()))?;
            if !meta.is_file() {
                bail!("{} is not a file", p.display());
            }
        }
        let dir = std::env::temp_dir().join(unique_name("bench-bin"));
        std::fs::create_dir_all(&dir)?;
        Ok(Shipped {
            mic,
            nmi,
            cores: Cores::of_machine(),
            dir,
        })
    }

    /// This project's mic.
    pub fn mic_program(&self) -> Program {
        Program::binary(&self.mic)
    }

    /// This project's nmi, pinned to nmi's core.
    pub fn nmi_program(&self) -> anyhow::Result<Program> {
        Ok(Program::binary(self.pinned("nmi-rs", &self.nmi)?))
    }

    /// `program` (an nmi) with its executable started through a script that
    /// pins it to nmi's core first; its arguments and dialect unchanged.
    pub fn pin_nmi(&self, program: Program) -> anyhow::Result<Program> {
        let name = format!("nmi-{:?}", program.dialect).to_lowercase();
        let path = self.pinned(&name, &program.path)?;
        Ok(Program { path, ..program })
    }

    /// A script `name` that execs `exe` with its arguments, pinned to nmi's
    /// core (`taskset` execs too: the process ID stays the one started, and
    /// the runtime sizes itself for one core from its first instruction).
    fn pinned(&self, name: &str, exe: &Path) -> anyhow::Result<PathBuf> {
        let Some(core) = self.cores.nmi else {
            return Ok(exe.to_path_buf());
        };
        let text = exe.to_str().context("executable path is not UTF-8")?;
        if text.contains('\'') {
            bail!("executable path {text:?} has a quote");
        }
        let script = self.dir.join(name);
        std::fs::write(
            &script,
            format!("#!/bin/sh\nexec taskset -c {core} '{text}' \"$@\"\n"),
        )?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        Ok(script)
    }
}

impl Drop for Shipped {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `cargo build --release --locked -p <name> --bin <name>` in the
/// repository (with this process's `CARGO_TARGET_DIR`); the executable
/// cargo reports.
fn build_release(name: &str) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building the shipped {name}: cargo build --release --locked -p {name} --bin {name}");
    let out = Command::new(cargo)
        .args(["build", "--release", "--locked", "-p", name, "--bin", name])
        .arg("--message-format=json-render-diagnostics")
        .current_dir(aadpodid_testkit::repo_root())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("run cargo")?;
    if !out.status.success() {
        bail!("cargo build of {name} failed ({})", out.status);
    }
    executable_of(&String::from_utf8_lossy(&out.stdout), name)
        .with_context(|| format!("cargo reported no executable for {name}"))
}

/// The `executable` of the `compiler-artifact` message of binary `name` in
/// cargo's JSON messages.
fn executable_of(messages: &str, name: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_executable_comes_from_cargos_artifact_message() {
        let messages = concat!(
            "{\"reason\":\"compiler-artifact\",\"target\":{\"name\":\"nmi\",\"kind\":[\"lib\"]},\"executable\":null}\n",
            "not json\n",
            "{\"reason\":\"compiler-artifact\",\"target\":{\"name\":\"nmi\",\"kind\":[\"bin\"]},\"executable\":\"/t/release/nmi\"}\n",
            "{\"reason\":\"build-finished\",\"success\":true}\n",
        );
        assert_eq!(
            executable_of(messages, "nmi"),
            Some(PathBuf::from("/t/release/nmi"))
        );
        assert_eq!(executable_of(messages, "mic"), None);
    }
}
