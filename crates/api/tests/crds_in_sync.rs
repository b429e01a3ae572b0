//! The committed CRD YAML must be exactly what the Rust types generate.

use std::path::Path;

#[test]
fn committed_crds_match_the_rust_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut stale = Vec::new();
    for (rel, want) in aadpodid_api::crd::files().expect("render CRDs") {
        let have = std::fs::read_to_string(root.join(&rel)).unwrap_or_default();
        if have != want {
            stale.push(rel);
        }
    }
    assert!(
        stale.is_empty(),
        "CRD YAML out of date: {stale:?}; run `cargo run -p aadpodid-api --bin crdgen` and commit the result"
    );
}
