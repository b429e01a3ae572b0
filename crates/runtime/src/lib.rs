//! Process plumbing that mic and nmi share, so that both behave the same way:
//! logging, one shutdown source, the probe and metrics HTTP server, the
//! Kubernetes client and an Event publisher.

pub mod admin;
pub mod client;
pub mod events;
pub mod logging;
pub mod shutdown;

pub use admin::{Health, serve_admin};
pub use shutdown::Shutdown;
