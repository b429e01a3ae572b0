//! mic and nmi are this binary re-executed with [`ROLE_ENV`] set: the child
//! runs exactly `mic::cli_main` or `nmi::cli_main` with its own arguments, so
//! the demo needs no other executable next to it.

use std::process::ExitCode;

use aadpodid_testkit::world::Program;

use anyhow::{Context as _, bail};

/// Environment variable that turns this binary into mic or nmi.
pub const ROLE_ENV: &str = "AADPODID_LOCAL_UP_ROLE";

/// What a re-executed child of the demo runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `mic::cli_main`.
    Mic,
    /// `nmi::cli_main`.
    Nmi,
}

impl Role {
    /// The value of [`ROLE_ENV`] for this role.
    pub fn name(self) -> &'static str {
        match self {
            Role::Mic => "mic",
            Role::Nmi => "nmi",
        }
    }

    /// The role a value of [`ROLE_ENV`] names.
    pub fn parse(value: &str) -> anyhow::Result<Role> {
        match value {
            "mic" => Ok(Role::Mic),
            "nmi" => Ok(Role::Nmi),
            other => bail!("unknown {ROLE_ENV} {other:?} (want mic or nmi)"),
        }
    }

    /// The role this process was started in, if any.
    pub fn of_this_process() -> anyhow::Result<Option<Role>> {
        std::env::var_os(ROLE_ENV)
            .map(|v| Role::parse(&v.to_string_lossy()))
            .transpose()
    }

    /// Runs the role's command to its end (its arguments are this process's).
    /// mic builds its own runtime, as the shipped binary does.
    pub fn run(self) -> ExitCode {
        let result = match self {
            Role::Mic => mic::cli_main(),
            Role::Nmi => tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("start the Tokio runtime")
                .and_then(|rt| rt.block_on(nmi::cli_main())),
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{}: {e:#}", self.name());
                ExitCode::FAILURE
            }
        }
    }

    /// How the demo starts this role: this executable with [`ROLE_ENV`] set.
    pub fn program(self) -> anyhow::Result<Program> {
        Program::this_executable_as(ROLE_ENV, self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_round_trip_and_others_are_refused() {
        for role in [Role::Mic, Role::Nmi] {
            assert_eq!(Role::parse(role.name()).ok(), Some(role));
        }
        for bad in ["", "MIC", "relay", "bench"] {
            assert!(Role::parse(bad).is_err(), "{bad:?}");
        }
        let nmi = Role::Nmi.program().unwrap();
        assert_eq!(nmi.env, [(ROLE_ENV.to_string(), "nmi".to_string())]);
    }
}
