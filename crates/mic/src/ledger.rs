//! The ownership ledger: which user-assigned identities MIC itself put on
//! each VMSS/VM. MIC removes only those; an identity found on a resource
//! without an entry was there before MIC (the kubelet identity, add-on
//! identities) and is never removed nor served.
//!
//! It is kept in a ConfigMap in MIC's own namespace
//! (`--owned-identities-configmap`, default [`DEFAULT_CONFIGMAP`]), one data
//! key per resource:
//!
//! - key `vmss.<name>` or `vm.<name>`, lower-cased;
//! - value: the sorted, newline-separated fingerprints of the identities MIC
//!   added there, each the first 32 hex digits of SHA-256 of the lower-cased
//!   identity resource ID (33 bytes an entry: 100 scale sets of 100
//!   identities stay near 330 KB, well below the 1 MiB object limit).
//!
//! Rules (decided in [`crate::guard`], carried out by the executor):
//! an entry is written before the PATCH that adds an identity not yet on the
//! resource (no entry written, no PATCH); entries of identities no longer on
//! the resource and not being added are dropped once the resource is read
//! back, which is also how an entry leaves after its removal lands. When the
//! ConfigMap does not exist yet it is created seeded from every existing
//! AzureAssignedIdentity, so an identity an earlier MIC (upstream's too)
//! assigned counts as added by MIC. Only the leader reads and writes it, and
//! it reads it afresh each time it becomes leader. Each resource's key is
//! written with a JSON merge patch of that key alone, so concurrent work on
//! other resources never conflicts.

use std::collections::{BTreeMap, BTreeSet};

use crate::cloud::{ResourceKind, ResourceRef, normalize_id};
use crate::index::Index;

/// Default name of the ledger ConfigMap.
pub const DEFAULT_CONFIGMAP: &str = "aad-pod-identity-mic-owned";

/// Hex digits of SHA-256 kept per entry (128 bits).
const FINGERPRINT_HEX: usize = 32;

/// The data key of a resource.
pub fn resource_key(r: &ResourceRef) -> String {
    let kind = match r.kind {
        ResourceKind::Vmss => "vmss",
        ResourceKind::Vm => "vm",
    };
    format!("{kind}.{}", r.name.to_lowercase())
}

/// The entry of an identity: 32 hex digits of SHA-256 of its lower-cased ID.
pub fn fingerprint(identity_id: &str) -> String {
    let digest = sha256(normalize_id(identity_id).as_bytes());
    let mut out = String::with_capacity(FINGERPRINT_HEX);
    for b in digest.iter().take(FINGERPRINT_HEX / 2) {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The ledger: per resource key, the fingerprints of identities MIC added.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    entries: BTreeMap<String, BTreeSet<String>>,
}

impl Ledger {
    /// From the ConfigMap's `data`; keys that are not `vmss.`/`vm.` and
    /// lines that are not fingerprints are ignored.
    pub fn from_data(data: &BTreeMap<String, String>) -> Self {
        let entries = data
            .iter()
            .filter(|(k, _)| k.starts_with("vmss.") || k.starts_with("vm."))
            .map(|(k, v)| {
                let set: BTreeSet<String> = v
                    .lines()
                    .map(str::trim)
                    .filter(|l| {
                        l.len() == FINGERPRINT_HEX && l.bytes().all(|b| b.is_ascii_hexdigit())
                    })
                    .map(str::to_ascii_lowercase)
                    .collect();
                (k.clone(), set)
            })
            .filter(|(_, set)| !set.is_empty())
            .collect();
        Ledger { entries }
    }

    /// The ConfigMap's `data`.
    pub fn to_data(&self) -> BTreeMap<String, String> {
        self.entries
            .iter()
            .filter(|(_, set)| !set.is_empty())
            .map(|(k, set)| (k.clone(), encode(set)))
            .collect()
    }

    /// Seeds a ledger from every AzureAssignedIdentity in the index whose
    /// node is known: its type-0 identity counts as added by MIC on the
    /// node's resource (upgrade from upstream, or a lost ConfigMap). An AAI
    /// this MIC refused (it carries the assignment-error annotation) proves
    /// nothing and is skipped: its identity may be a pre-existing one.
    pub fn seed(index: &Index) -> Self {
        let mut l = Ledger::default();
        for aai in index.assigned.values() {
            if aai
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(aadpodid_api::ANNOTATION_ASSIGNMENT_ERROR))
            {
                continue;
            }
            let Some(id) = crate::plan::assigned_identity_id(aai) else {
                continue;
            };
            if let Some(node) = index.nodes.get(&aai.spec.node_name) {
                l.entries
                    .entry(resource_key(&node.resource))
                    .or_default()
                    .insert(fingerprint(&id));
            }
        }
        l
    }

    /// Whether MIC added `identity_id` to `r`.
    pub fn owns(&self, r: &ResourceRef, identity_id: &str) -> bool {
        self.entries
            .get(&resource_key(r))
            .is_some_and(|s| s.contains(&fingerprint(identity_id)))
    }

    /// The fingerprints recorded for `r`.
    pub fn entries(&self, r: &ResourceRef) -> BTreeSet<String> {
        self.entries
            .get(&resource_key(r))
            .cloned()
            .unwrap_or_default()
    }

    /// Replaces the entries of `r` (after the write landed).
    pub fn set(&mut self, r: &ResourceRef, entries: BTreeSet<String>) {
        if entries.is_empty() {
            self.entries.remove(&resource_key(r));
        } else {
            self.entries.insert(resource_key(r), entries);
        }
    }

    /// Number of resources with entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// `old` plus the fingerprints of `ids` (entries to write before a PATCH).
pub fn with_added(old: &BTreeSet<String>, ids: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = old.clone();
    out.extend(ids.iter().map(|id| fingerprint(id)));
    out
}

/// The entries of a resource once it has been read back: those of `old`
/// whose identity is on the resource (`present`) or still being added
/// (`adding`). This drops the entry of a removal that landed and prunes
/// entries of identities that left by other means. Pure.
pub fn pruned(
    old: &BTreeSet<String>,
    present: &BTreeSet<String>,
    adding: &BTreeSet<String>,
) -> BTreeSet<String> {
    let live: BTreeSet<String> = present
        .iter()
        .chain(adding)
        .map(|id| fingerprint(id))
        .collect();
    old.intersection(&live).cloned().collect()
}

/// The value of one data key: sorted fingerprints, one a line.
pub fn encode(entries: &BTreeSet<String>) -> String {
    entries.iter().cloned().collect::<Vec<_>>().join("\n")
}

/// SHA-256 (FIPS 180-4). MIC needs it only for ledger fingerprints, and a
/// few lines here spare the workspace a crypto dependency.
fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: &[u8]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn sha256_known_answers() {
        let cases = [
            (
                "",
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            ),
            (
                "abc",
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            ),
            (
                "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
                "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(hex(&sha256(input.as_bytes())), want, "{input:?}");
        }
        // 1,000 bytes: several blocks.
        let long = vec![b'a'; 1000];
        assert_eq!(
            hex(&sha256(&long)),
            "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3"
        );
    }

    #[test]
    fn fingerprints_ignore_case_and_are_32_hex() {
        let a = fingerprint(
            "/subscriptions/S/resourceGroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/X",
        );
        let b = fingerprint(
            "/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/x",
        );
        assert_eq!(a, b);
        assert_eq!(a.len(), 32);
        assert_eq!(
            resource_key(&ResourceRef::vmss("AKS-Pool-VMSS")),
            "vmss.aks-pool-vmss"
        );
        assert_eq!(resource_key(&ResourceRef::vm("Vm1")), "vm.vm1");
    }

    #[test]
    fn data_round_trip_and_junk_is_ignored() {
        let r = ResourceRef::vmss("v");
        let mut l = Ledger::default();
        l.set(
            &r,
            with_added(&BTreeSet::new(), &["/x/b".into(), "/x/a".into()].into()),
        );
        let data = l.to_data();
        assert_eq!(data.len(), 1);
        let value = &data["vmss.v"];
        let lines: Vec<&str> = value.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0] < lines[1], "sorted");
        let mut with_junk = data.clone();
        with_junk.insert("other".into(), "x".into());
        with_junk.insert("vm.w".into(), "not-a-fingerprint\n".into());
        assert_eq!(Ledger::from_data(&with_junk), l);
        assert!(l.owns(&r, "/X/A"));
        assert!(!l.owns(&ResourceRef::vm("v"), "/x/a"), "per resource");
        l.set(&r, BTreeSet::new());
        assert!(l.is_empty());
    }

    #[test]
    fn size_of_a_large_ledger_stays_far_below_one_mebibyte() {
        let mut l = Ledger::default();
        for s in 0..100 {
            let ids: BTreeSet<String> = (0..100)
                .map(|i| format!("/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/id-{i}"))
                .collect();
            l.set(
                &ResourceRef::vmss(format!("aks-nodepool{s}-12345678-vmss")),
                with_added(&BTreeSet::new(), &ids),
            );
        }
        let bytes: usize = l.to_data().iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(bytes < 400 * 1024, "{bytes} bytes");
    }

    #[test]
    fn pruning_keeps_present_or_adding_only() {
        let (a, b, c) = ("/x/a".to_string(), "/x/b".to_string(), "/x/c".to_string());
        let old = with_added(&BTreeSet::new(), &[a.clone(), b.clone(), c.clone()].into());
        // (present, adding, kept)
        let cases: [(&[&String], &[&String], &[&String]); 4] = [
            (&[&a, &b, &c], &[], &[&a, &b, &c]),
            // b's removal landed; c left behind MIC's back and nobody wants it.
            (&[&a], &[], &[&a]),
            // c is not there yet but its add is pending.
            (&[&a], &[&c], &[&a, &c]),
            // Present identities without an entry get none (pre-existing).
            (&[&a, &"/x/z".to_string()], &[], &[&a]),
        ];
        for (present, adding, kept) in cases {
            let set = |v: &[&String]| v.iter().map(|s| (*s).clone()).collect::<BTreeSet<_>>();
            assert_eq!(
                pruned(&old, &set(present), &set(adding)),
                with_added(&BTreeSet::new(), &set(kept)),
                "{present:?} {adding:?}"
            );
        }
    }
}
