//! Writes the generated CRD YAML into the repository: `crds/*.yaml` and the chart's copy.
//!
//! Usage: `cargo run -p aadpodid-api --bin crdgen [REPO_ROOT]`

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."));
    for (rel, text) in aadpodid_api::crd::files()? {
        let path = root.join(&rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, text)?;
        println!("wrote {rel}");
    }
    Ok(())
}
