//! The test kit: a real etcd and kube-apiserver on loopback, a real `kubectl`,
//! network namespaces and one relay between them, bounded waits, tools built
//! from pinned Go modules, the real Python Azure SDK, fixtures, and the names,
//! ports and Azure IDs every test shares. It does not depend on mic or nmi, so
//! the emulator's tests use it without compiling them.
//!
//! # How a test gets a cluster
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let cluster = aadpodid_testkit::Cluster::shared();
//! let ns = cluster.temp_namespace("my-test").await?;
//! let client = cluster.admin_client().await?;
//! # Ok(()) }
//! ```
//!
//! [`Cluster::shared`] starts one cluster per test process (one test binary) the
//! first time any test asks, and every test of that binary shares it. Cargo runs
//! test binaries one after another, so each binary gets its own cluster and they
//! never overlap. Tests isolate themselves with [`Cluster::temp_namespace`].
//!
//! A failure test that stops and restarts the kube-apiserver takes a cluster of
//! its own instead: [`PrivateCluster::start`].
//!
//! Each test runs on its own Tokio runtime, and a `kube::Client` belongs to the
//! runtime that made it, so tests ask for a new client ([`Cluster::admin_client`])
//! rather than sharing one.
//!
//! The binaries come from `tests/cluster/build.sh` (Go modules, cached under
//! `$HOME/.cache/aadpodid/cluster`), or from `$AADPODID_CLUSTER_BIN` when set.
//!
//! # Modules
//!
//! | module | what |
//! | --- | --- |
//! | [`cluster`] | [`Cluster`], [`PrivateCluster`] |
//! | [`kubectl`] | [`KubectlOutput`], [`TempNamespace`] |
//! | [`wait`] | [`wait_for`] |
//! | [`netns`] | [`netns::NetNs`], [`netns::Node`] (node and pod namespaces) |
//! | [`relay`] | the relay between namespaces over Unix sockets |
//! | [`tools`] | [`tools::BuiltTool`] (a tool a script builds, found once per process or named by an environment variable), [`run_build_script`], [`tools::last_line_json`] (a helper program's JSON result) |
//! | [`python`] | [`python_sdk`], [`python_imds_token`] |
//! | [`children`] | [`run_children_trusting_emulator_ca`], [`children::ChildEnv`] (what the child is handed), [`children::is_child`], [`emulator_ca_parent_test!`] (the parent test in one line) |
//! | [`fixtures`] | [`repo_root`], [`fixture`], [`fill_template`] |
//! | [`env`](mod@env) | [`env::PROXY_VARS`] (removed from processes under test) |
//! | [`ids`] | [`unique_name`], [`free_port`], [`free_ports`], [`TENANT`], [`SUB`] |
//! | [`world`] | [`world::World`] built from [`world::Options`]: the end-to-end world (tenant, nodes, mic replicas and nmi per node as [`world::Program`]s, pods, namespace users, the chart's arguments) |
//! | [`helm`] | [`helm::Render`], [`helm::template`] (a real `helm` rendering the chart), [`helm::Migration`] (helm and kubectl steps of an in-place migration, each timed and checked for recreated objects) |
//! | [`http`] | [`http::http_get`] (a bounded plain GET on loopback: probes, metrics) |
//! | [`tenant`] | [`tenant::Tenant`] (the emulator's seeds), [`tenant::MicCloud`] (MIC's `azure.json`), [`tenant::CloudEnvironment`], [`tenant::write_mic_cloud_files`], [`tenant::mic_args`], [`tenant::mic_env`] and the tenant's names and IDs |
//! | [`upstream`] | [`upstream::upstream_bin_dir`], [`upstream::spawn_upstream_mic`], [`upstream::spawn_upstream_nmi`] (upstream v1.8.17's own mic and nmi) |
//! | [`flood`] | [`flood::Plan`], [`flood::Flood`], [`flood::Sampler`] (bounded floods a pod sends to NMI, and NMI's resources meanwhile) |
//! | [`realnode`] | [`realnode::RealNode`], [`realnode::ControlPlane`], [`realnode::Fabric`] (real kubelet + containerd nodes in namespaces of the test) |
//! | [`realcloud`] | [`realcloud::NodeCloud`] (IMDS and the emulator's ARM/Entra ID inside a real node), [`realcloud::CloudCa`] |
//! | [`procfs`] | [`procfs::memory`], [`procfs::cpu`], [`procfs::find_exe`], [`procfs::children`] (a process's memory, CPU and children from `/proc`) |

pub mod children;
pub mod cluster;
pub mod env;
pub mod fixtures;
pub mod flood;
pub mod helm;
pub mod http;
pub mod ids;
pub mod kubectl;
pub mod netns;
pub mod procfs;
pub mod python;
pub mod realcloud;
pub mod realnode;
pub mod relay;
pub mod tenant;
pub mod tools;
pub mod upstream;
pub mod wait;
pub mod world;

pub use children::run_children_trusting_emulator_ca;
pub use cluster::{Cluster, ClusterOptions, ETCD_VERSION, KUBERNETES_VERSION, PrivateCluster};
pub use fixtures::{fill_template, fixture, repo_root};
pub use ids::{SUB, TENANT, free_port, free_ports, unique_name};
pub use kubectl::{KubectlOutput, TempNamespace, run_kubectl};
pub use python::{IdentitySelector, python_imds_token, python_sdk};
pub use tools::run_build_script;
pub use wait::wait_for;
