//! Integration tests of the project and the worlds they build (the e2e
//! world, a node of nmi, upstream's binaries, helm, the benchmark), on the
//! test kit (`crates/testkit`): a real etcd and kube-apiserver on loopback, a
//! real `kubectl`, network namespaces, bounded waits.
//!
//! Everything of the kit is re-exported here, so tests keep writing
//! `aadpodid_tests::Cluster` or `aadpodid_tests::netns::NetNs`.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let cluster = aadpodid_tests::Cluster::shared();
//! let ns = cluster.temp_namespace("my-test").await?;
//! let client = cluster.admin_client().await?;
//! # Ok(()) }
//! ```

pub mod assigned;
pub mod chart_release;
pub use aadpodid_testkit::world as e2e;
pub mod go_mic;
pub mod mic_world;
pub mod nmi_node;
pub mod realhelm;

pub use aadpodid_testkit::*;
pub use aadpodid_testkit::{env, netns, relay};
