//! Flag values spelled as upstream's Go binaries take them, for mic's and
//! nmi's command lines.

/// Go's `strconv.ParseBool`: `1`, `t`, `T`, `TRUE`, `true`, `True` and their
/// false counterparts; anything else is an error naming the value.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        other => Err(format!("invalid boolean value {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_booleans() {
        for s in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_go_bool(s), Ok(true), "{s}");
        }
        for s in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_go_bool(s), Ok(false), "{s}");
        }
        for s in ["", "yes", "no", "tRUE", "fAlse", " true", "true ", "2"] {
            assert_eq!(
                parse_go_bool(s),
                Err(format!("invalid boolean value {s:?}")),
                "{s:?}"
            );
        }
    }
}
