//! The pinned Python azure-identity is installed and driven by the harness: with
//! nothing answering at the IMDS address it reports the SDK's own
//! "unavailable" error rather than a token.

use aadpodid_tests::{IdentitySelector, python_imds_token};

#[test]
fn python_managed_identity_credential_reports_unreachable_imds() -> anyhow::Result<()> {
    // Port 1 on loopback: nothing listens there.
    let out = python_imds_token(
        Some("http://127.0.0.1:1"),
        "https://management.azure.com/.default",
        IdentitySelector::ClientId("00000000-0000-0000-0000-000000000000"),
        None,
    )?;
    assert_eq!(out["error_type"], "CredentialUnavailableError", "{out}");
    assert!(
        out["error"]
            .as_str()
            .unwrap_or_default()
            .contains("no response from the IMDS endpoint"),
        "{out}"
    );
    assert!(out.get("token").is_none());
    Ok(())
}
