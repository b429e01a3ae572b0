//! Values that must never reach logs.

use std::fmt;
use std::sync::Arc;

/// A secret string (access token, client secret). `Debug` and `Display` print
/// `<redacted>`; the value is read only through [`Secret::expose`]. Shared,
/// not copied, by `clone`: each cached token served hands out the cache's
/// JWT by reference count.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Arc::from(value.into()))
    }

    /// The value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_are_redacted() {
        let s = Secret::new("eyJhbGciOi.secret");
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
        assert_eq!(s.expose(), "eyJhbGciOi.secret");
    }

    #[test]
    fn clones_share_the_value() {
        let s = Secret::new("eyJhbGciOi.secret");
        let c = s.clone();
        assert_eq!(c, s);
        assert!(
            std::ptr::eq(c.expose(), s.expose()),
            "a clone copies nothing"
        );
    }
}
