//! Tests that must trust a fresh emulator test CA run again in a child
//! process of the same test binary, with `SSL_CERT_FILE` set for it.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::env::PROXY_VARS;
use crate::ids::unique_name;

/// Runs the `#[ignore]`d tests of the calling test binary whose names start
/// with `prefix` in a child process that trusts a fresh emulator test CA through
/// `SSL_CERT_FILE` (which a running test cannot set for itself: `set_var` is
/// unsafe, and unsafe code is forbidden). The child gets `<ENV>_CHILD=1`,
/// `<ENV>_CA_CERT`, `<ENV>_CA_KEY` (the CA to start emulators with) and
/// `<ENV>_DIR` (a scratch folder, removed afterwards), no proxy settings, and
/// must finish within `timeout` with exactly `expected` tests passed.
pub async fn run_children_trusting_emulator_ca(
    prefix: &str,
    env: &str,
    expected: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(unique_name(&env.to_lowercase()));
    std::fs::create_dir_all(&dir)?;
    let result = run_children_in(&dir, prefix, env, expected, timeout).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_children_in(
    dir: &Path,
    prefix: &str,
    env: &str,
    expected: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let ca = azure_emulator::TestCa::generate()?;
    let (cert, key, bundle) = (
        dir.join("ca.pem"),
        dir.join("ca-key.pem"),
        dir.join("bundle.pem"),
    );
    std::fs::write(&cert, ca.cert_pem())?;
    std::fs::write(&key, ca.key_pem())?;
    azure_emulator::tls::write_bundle(ca.cert_pem(), &bundle)?;
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.args([prefix, "--ignored", "--nocapture", "--test-threads=1"])
        .env(format!("{env}_CHILD"), "1")
        .env("SSL_CERT_FILE", &bundle)
        .env(format!("{env}_CA_CERT"), &cert)
        .env(format!("{env}_CA_KEY"), &key)
        .env(format!("{env}_DIR"), dir)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .kill_on_drop(true);
    for var in std::iter::once("AZURE_AUTHORITY_HOST").chain(PROXY_VARS) {
        cmd.env_remove(var);
    }
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .with_context(|| format!("child tests did not finish within {timeout:?}"))??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    if !out.status.success() {
        bail!(
            "child tests failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every child test must have run and passed in the child process.
    let ran = stdout
        .lines()
        .find(|l| l.starts_with("test result:"))
        .unwrap_or_default();
    if !ran.contains(&format!("{expected} passed; 0 failed")) {
        bail!("expected {expected} child tests to pass:\n{stdout}");
    }
    Ok(())
}

/// What [`run_children_trusting_emulator_ca`] hands its child process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildEnv {
    /// `<ENV>_DIR`: a scratch folder, removed after the children ran.
    pub dir: std::path::PathBuf,
    /// `<ENV>_CA_CERT`: the test CA's certificate (PEM) to start emulators with.
    pub ca_cert: std::path::PathBuf,
    /// `<ENV>_CA_KEY`: its key (PEM).
    pub ca_key: std::path::PathBuf,
}

impl ChildEnv {
    /// The child's environment for `env`; `None` outside the child process.
    pub fn get(env: &str) -> Option<ChildEnv> {
        let var = |suffix: &str| std::env::var_os(format!("{env}_{suffix}")).map(Into::into);
        Some(ChildEnv {
            dir: var("DIR")?,
            ca_cert: var("CA_CERT")?,
            ca_key: var("CA_KEY")?,
        })
    }

    /// The test CA as (certificate, key), as `tenant::Tenant::test_ca` takes it.
    pub fn test_ca(&self) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
        Some((self.ca_cert.clone(), self.ca_key.clone()))
    }
}

/// Whether this process is a child of [`run_children_trusting_emulator_ca`]
/// for `env` (`<ENV>_CHILD` is set).
pub fn is_child(env: &str) -> bool {
    std::env::var_os(format!("{env}_CHILD")).is_some()
}

/// The parent test of a test binary whose `child_` tests must trust the
/// emulator's test CA: it runs them with [`run_children_trusting_emulator_ca`]
/// (environment prefix `env`, `expected` tests, `timeout_secs`), and does
/// nothing inside the child process itself.
///
/// ```ignore
/// aadpodid_testkit::emulator_ca_parent_test!(mic_arm_against_the_emulator, "MICARM", 2, 300);
/// ```
#[macro_export]
macro_rules! emulator_ca_parent_test {
    ($name:ident, $env:literal, $expected:expr, $timeout_secs:expr) => {
        #[tokio::test]
        async fn $name() {
            if $crate::children::is_child($env) {
                return;
            }
            if let Err(e) = $crate::run_children_trusting_emulator_ca(
                "child_",
                $env,
                $expected,
                ::std::time::Duration::from_secs($timeout_secs),
            )
            .await
            {
                panic!("{e:?}");
            }
        }
    };
}
