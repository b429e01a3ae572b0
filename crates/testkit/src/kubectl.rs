//! `kubectl` runs, kubeconfig files and clients, and namespaces that live as
//! long as a guard.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Context as _;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// What a kubectl run printed.
#[derive(Debug)]
pub struct KubectlOutput {
    /// Exit status was 0.
    pub success: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `cmd` (a kubectl command, for example [`crate::Cluster::kubectl_with`])
/// with `args`, a 30 s request timeout and `stdin`; returns what it printed.
pub fn run_kubectl(
    mut cmd: Command,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<KubectlOutput> {
    use std::io::Write as _;
    cmd.args(args).args(["--request-timeout", "30s"]);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().context("spawn kubectl")?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    Ok(KubectlOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// A namespace that lives as long as the guard.
#[derive(Debug)]
pub struct TempNamespace {
    name: String,
    kubectl: Command,
}

impl TempNamespace {
    /// A guard that deletes namespace `name` with `kubectl` on drop.
    pub(crate) fn new(name: String, kubectl: Command) -> Self {
        TempNamespace { name, kubectl }
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TempNamespace {
    fn drop(&mut self) {
        // Without kube-controller-manager the namespace stays Terminating with its
        // contents; it is out of every other test's way all the same.
        let _ = self
            .kubectl
            .args([
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

pub(crate) async fn client_from_kubeconfig(path: &Path) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

pub(crate) fn kubeconfig_yaml(server: &str, ca: &Path, user: &str, credentials: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    {credentials}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: {user}\ncurrent-context: test\n",
        ca = ca.display()
    )
}
