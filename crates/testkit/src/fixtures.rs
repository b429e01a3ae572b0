//! The repository's files: its root, `tests/fixtures/`, and templates filled
//! as `envsubst` would.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Root of the repository (for `crds/`, fixtures and the build scripts).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Replaces `${NAME}` and `$NAME` in a template, as `envsubst` or Terraform's
/// `templatefile` would; `vars` are (NAME, value). Longer names are replaced
/// first so that `$A` does not eat the start of `$AB`.
pub fn fill_template(text: &str, vars: &[(&str, &str)]) -> String {
    let mut vars = vars.to_vec();
    vars.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    let mut out = text.to_string();
    for (k, v) in vars {
        out = out
            .replace(&format!("${{{k}}}"), v)
            .replace(&format!("${k}"), v);
    }
    out
}

/// Reads a file of `tests/fixtures/`.
pub fn fixture(name: &str) -> anyhow::Result<String> {
    let path = repo_root().join("tests/fixtures").join(name);
    std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_template_handles_both_forms_and_prefixes() {
        let t = "a: ${UAIName}-x\nb: $POD\nc: $PODNAME\n";
        let out = fill_template(t, &[("UAIName", "id1"), ("POD", "p"), ("PODNAME", "q")]);
        assert_eq!(out, "a: id1-x\nb: p\nc: q\n");
    }
}
