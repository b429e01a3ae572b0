//! Environment variables a test removes from the processes it starts.

/// Proxy settings: a process under test must reach loopback and namespace
/// addresses directly, never through a proxy of the machine running the tests.
pub const PROXY_VARS: [&str; 6] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
];
