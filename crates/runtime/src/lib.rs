//! Process plumbing that mic and nmi share, so that both behave the same way:
//! logging, one shutdown source, the probe and metrics HTTP server, metrics
//! made and registered in one step, the Kubernetes client, an Event
//! publisher, the list-and-watch loop that keeps a local view of a kind
//! current, the azure.json reader, and Go-style flag values.

pub mod admin;
pub mod azure_json;
pub mod client;
pub mod events;
pub mod flags;
pub mod logging;
pub mod metrics;
pub mod shutdown;
pub mod size;
pub mod watch;

pub use admin::{Health, serve_admin};
pub use shutdown::Shutdown;
