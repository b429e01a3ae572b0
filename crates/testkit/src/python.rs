//! The pinned real Python Azure SDK in a cached virtualenv, and a token
//! request made with its `ManagedIdentityCredential`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::fixtures::repo_root;
use crate::netns;
use crate::tools::{BuiltTool, last_line_json, output_within};

/// Bound on one SDK token request (the SDK's own retries included).
const SDK_TIMEOUT: Duration = Duration::from_secs(120);

/// The virtualenv's Python, made by `tests/python/setup.sh` (given 30 minutes
/// when not cached yet).
static PYTHON: BuiltTool = BuiltTool::new("tests/python/setup.sh", Duration::from_secs(30 * 60));

/// The Python of a virtualenv holding the pinned real Python Azure SDK
/// (`tests/python/requirements.txt`), created on first use by
/// `tests/python/setup.sh` and cached under `$HOME/.cache/aadpodid`.
pub fn python_sdk() -> anyhow::Result<PathBuf> {
    PYTHON.path()
}

/// Which user-assigned identity a managed-identity client asks for.
#[derive(Clone, Copy, Debug)]
pub enum IdentitySelector<'a> {
    /// No selector: the machine's only (or system-assigned) identity.
    Default,
    /// `client_id`.
    ClientId(&'a str),
    /// `msi_res_id` (the ARM resource ID).
    ResourceId(&'a str),
    /// `object_id` (the principal ID).
    ObjectId(&'a str),
}

/// Asks for a token with the real Python `ManagedIdentityCredential`, pointed at
/// `imds_base` (for example `http://127.0.0.1:8080`) through the SDK's own
/// `AZURE_POD_IDENTITY_AUTHORITY_HOST`. Returns the script's JSON line:
/// `{"token", "expires_on"}` on success, `{"error_type", "error"}` on failure.
/// The script is run inside `netns` when given (then `imds_base` may be
/// `http://169.254.169.254`).
pub fn python_imds_token(
    imds_base: Option<&str>,
    scope: &str,
    selector: IdentitySelector<'_>,
    netns: Option<&netns::NetNs>,
) -> anyhow::Result<serde_json::Value> {
    let python = python_sdk()?;
    let script = repo_root().join("tests/python/imds_token.py");
    let mut cmd = match netns {
        Some(ns) => ns.command(&python),
        None => Command::new(&python),
    };
    cmd.arg(&script).arg(scope);
    match selector {
        IdentitySelector::Default => {}
        IdentitySelector::ClientId(v) => {
            cmd.args(["--client-id", v]);
        }
        IdentitySelector::ResourceId(v) => {
            cmd.args(["--resource-id", v]);
        }
        IdentitySelector::ObjectId(v) => {
            cmd.args(["--object-id", v]);
        }
    }
    // Only the IMDS source may be chosen: clear every variable that selects another.
    for var in [
        "IDENTITY_ENDPOINT",
        "IDENTITY_HEADER",
        "IDENTITY_SERVER_THUMBPRINT",
        "IMDS_ENDPOINT",
        "MSI_ENDPOINT",
        "MSI_SECRET",
        "AZURE_FEDERATED_TOKEN_FILE",
        "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    ] {
        cmd.env_remove(var);
    }
    if let Some(base) = imds_base {
        cmd.env("AZURE_POD_IDENTITY_AUTHORITY_HOST", base);
    }
    cmd.stderr(Stdio::piped());
    let out = output_within(&mut cmd, "imds_token.py", SDK_TIMEOUT)?;
    last_line_json("imds_token.py", &out)
}
