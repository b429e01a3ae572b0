//! Process plumbing that mic and nmi share, so that both behave the same way:
//! logging, one shutdown source, the probe and metrics HTTP server, and the
//! Kubernetes client.

pub mod admin;
pub mod client;
pub mod logging;
pub mod shutdown;

pub use admin::{Health, serve_admin};
pub use shutdown::Shutdown;
