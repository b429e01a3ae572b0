//! ARM resource IDs, GUIDs and base64 helpers.
//!
//! ARM names are case-insensitive and responses keep the stored casing
//! (as ARM does), so every map in the state is
//! keyed by the lower-cased ID and stores the display form beside it.

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};

/// A random version-4 GUID in the usual 8-4-4-4-12 form.
pub fn new_guid() -> String {
    let mut b = [0u8; 16];
    // SystemRandom only fails when the OS RNG is unavailable; fall back to a
    // counter-based value rather than panic, since uniqueness is all we need.
    if SystemRandom::new().fill(&mut b).is_err() {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(1);
        b[..8].copy_from_slice(&N.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

pub fn key(id: &str) -> String {
    id.trim_end_matches('/').to_ascii_lowercase()
}

pub fn uai_id(sub: &str, rg: &str, name: &str) -> String {
    format!(
        "/subscriptions/{sub}/resourcegroups/{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

pub fn vmss_id(sub: &str, rg: &str, name: &str) -> String {
    format!(
        "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachineScaleSets/{name}"
    )
}

pub fn vm_id(sub: &str, rg: &str, name: &str) -> String {
    format!(
        "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}"
    )
}

/// Parses `/subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}`
/// case-insensitively; returns (subscription, resource group, name).
pub fn parse_uai_id(id: &str) -> Option<(String, String, String)> {
    let parts: Vec<&str> = id.trim_end_matches('/').split('/').collect();
    match parts.as_slice() {
        ["", s, sub, r, rg, p, ns, t, name]
            if s.eq_ignore_ascii_case("subscriptions")
                && r.eq_ignore_ascii_case("resourcegroups")
                && p.eq_ignore_ascii_case("providers")
                && ns.eq_ignore_ascii_case("Microsoft.ManagedIdentity")
                && t.eq_ignore_ascii_case("userAssignedIdentities")
                && !sub.is_empty()
                && !rg.is_empty()
                && !name.is_empty() =>
        {
            Some((sub.to_string(), rg.to_string(), name.to_string()))
        }
        _ => None,
    }
}

pub fn b64url(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

pub fn b64std(data: &[u8]) -> String {
    STANDARD.encode(data)
}

/// Decodes base64url (padded or not) and standard base64: clients send
/// certificate thumbprints in all three forms (adal: padded base64url; the
/// Rust SDK: standard base64).
pub fn b64_any(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .or_else(|_| URL_SAFE.decode(text))
        .or_else(|_| STANDARD.decode(text))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_are_v4_shaped_and_distinct() {
        let a = new_guid();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, new_guid());
    }

    #[test]
    fn uai_ids_parse_case_insensitively() {
        let (s, rg, n) = parse_uai_id("/SUBSCRIPTIONS/s1/resourcegroups/RG/providers/microsoft.managedidentity/USERASSIGNEDIDENTITIES/id1")
            .expect("parses");
        assert_eq!((s.as_str(), rg.as_str(), n.as_str()), ("s1", "RG", "id1"));
        assert!(
            parse_uai_id(
                "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/x"
            )
            .is_none()
        );
        assert!(parse_uai_id("garbage").is_none());
    }

    #[test]
    fn base64_accepts_all_thumbprint_forms() {
        let raw = [0xccu8, 0x7f, 0xfc, 0x19, 0xb0, 0x98];
        for enc in [
            STANDARD.encode(raw),
            URL_SAFE.encode(raw),
            URL_SAFE_NO_PAD.encode(raw),
        ] {
            assert_eq!(b64_any(&enc).as_deref(), Some(&raw[..]), "{enc}");
        }
        let odd = [1u8, 2, 3, 4];
        assert_eq!(b64_any(&STANDARD.encode(odd)).as_deref(), Some(&odd[..]));
        assert_eq!(b64_any(&URL_SAFE.encode(odd)).as_deref(), Some(&odd[..]));
    }
}
