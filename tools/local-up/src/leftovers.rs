//! What a run could leave behind: its child processes and the network
//! namespaces the test kit named after its process ID (the kit's helpers, as
//! the teardown reports them and the end-to-end test checks them).

pub use aadpodid_testkit::world::teardown::{child_pids, is_live, netns_of};
