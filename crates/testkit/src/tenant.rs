//! The emulated Azure tenant MIC is pointed at, and the files and flags that
//! point it there: seeds for the emulator (identities, scale sets, VMs, MIC's
//! service principal), MIC's `azure.json`, the custom-cloud environment file
//! (`AZURE_ENVIRONMENT_FILEPATH`) and MIC's standard command-line arguments.
//!
//! Nothing here needs mic or nmi: the integration tests, the e2e world, the
//! benchmark and the demo all build on it.
//!
//! ```no_run
//! # async fn demo(dir: &std::path::Path) -> anyhow::Result<()> {
//! use aadpodid_testkit::tenant::{self, CloudEnvironment, MicCloud, Tenant};
//! let emu = Tenant::standard()
//!     .scale_set("vmss", 2, &[tenant::KUBELET])
//!     .start()
//!     .await?;
//! let files = tenant::write_mic_cloud_files(
//!     dir,
//!     "",
//!     &MicCloud::standard(),
//!     &CloudEnvironment::of(&emu),
//! )?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use azure_emulator::config::{
    IdentityAssignmentSeed, IdentitySeed, PermissionsSeed, ScaleSetSeed, SecretSeed,
    ServicePrincipalSeed, VmSeed,
};
use azure_emulator::{Config, Emulator};
use serde::Serialize;
use serde_json::{Value, json};

use crate::ids::{SUB, TENANT};

/// The AKS node resource group: scale sets, VMs and the kubelet identity.
pub const NODE_RG: &str = "MC_rg_cluster_eastus";
/// The resource group of the identities pods use.
pub const APP_RG: &str = "app-rg";
/// The cluster's own identity (in [`NODE_RG`], on every scale set).
pub const KUBELET: &str = "kubelet";
/// Client ID of [`KUBELET`] (azure.json's `userAssignedIdentityID`).
pub const KUBELET_CLIENT: &str = "c0000000-0000-4000-8000-00000000000k";
/// A pod identity in [`APP_RG`].
pub const APP_ID: &str = "app-id";
/// Client ID of [`APP_ID`].
pub const APP_CLIENT: &str = "c0000000-0000-4000-8000-000000000001";
/// A second pod identity in [`APP_RG`].
pub const APP2_ID: &str = "app-2";
/// Client ID of [`APP2_ID`].
pub const APP2_CLIENT: &str = "c0000000-0000-4000-8000-000000000002";
/// MIC's service principal (azure.json's `aadClientId`).
pub const MIC_CLIENT: &str = "5b1c2c4e-0000-4000-8000-00000000c1d1";
/// The secret of [`MIC_CLIENT`].
pub const MIC_SECRET: &str = "s3cr3t";
/// The audience ARM tokens are asked for.
pub const ARM_AUDIENCE: &str = "https://management.azure.com/";
/// The cloud name that makes MIC read the custom-cloud environment file.
pub const CUSTOM_CLOUD: &str = "AzureStackCloud";
/// The environment variable naming the custom-cloud environment file.
pub const ENV_AZURE_ENVIRONMENT_FILEPATH: &str = "AZURE_ENVIRONMENT_FILEPATH";
/// The environment variable naming MIC's own namespace (its ConfigMap's).
pub const ENV_MIC_POD_NAMESPACE: &str = "MIC_POD_NAMESPACE";
/// The emulator's clock speed most tests use: a 45 s scale-set write takes
/// 0.45 s.
pub const FAST_CLOCK: f64 = 100.0;

/// ARM ID of user-assigned identity `name` in `rg` (case as given).
pub fn uai_id(rg: &str, name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

/// The providerID of a Node on instance `instance` of scale set `vmss` in
/// `rg`; the resource group is lower case, as AKS writes it.
pub fn vmss_provider_id(rg: &str, vmss: &str, instance: usize) -> String {
    format!(
        "azure:///subscriptions/{SUB}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachineScaleSets/{vmss}/virtualMachines/{instance}",
        rg.to_lowercase()
    )
}

/// The providerID of a Node on standalone VM `vm` in `rg` (case as given).
pub fn vm_provider_id(rg: &str, vm: &str) -> String {
    format!(
        "azure:///subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{vm}"
    )
}

/// A user-assigned identity with a fixed client ID.
pub fn identity_seed(name: &str, rg: &str, client_id: &str) -> IdentitySeed {
    IdentitySeed {
        name: name.into(),
        resource_group: rg.into(),
        client_id: Some(client_id.into()),
        principal_id: None,
        federated_credentials: vec![],
        permissions: PermissionsSeed::default(),
    }
}

/// A scale set in `rg` with instances `0..instances`, carrying the named
/// user-assigned identities and no system identity.
pub fn scale_set_seed(
    name: &str,
    rg: &str,
    instances: usize,
    user_assigned: &[&str],
) -> ScaleSetSeed {
    ScaleSetSeed {
        name: name.into(),
        resource_group: rg.into(),
        instances: (0..instances).map(|i| i.to_string()).collect(),
        identity: IdentityAssignmentSeed {
            system_assigned: false,
            user_assigned: user_assigned.iter().map(|s| s.to_string()).collect(),
        },
    }
}

/// A standalone VM in `rg`, with or without a system identity, carrying the
/// named user-assigned identities.
pub fn vm_seed(name: &str, rg: &str, system_assigned: bool, user_assigned: &[&str]) -> VmSeed {
    VmSeed {
        name: name.into(),
        resource_group: rg.into(),
        identity: IdentityAssignmentSeed {
            system_assigned,
            user_assigned: user_assigned.iter().map(|s| s.to_string()).collect(),
        },
    }
}

/// A service principal that signs in with one plain secret.
pub fn service_principal_seed(client_id: &str, secret: &str) -> ServicePrincipalSeed {
    ServicePrincipalSeed {
        client_id: client_id.into(),
        object_id: None,
        secrets: vec![SecretSeed::Plain(secret.into())],
        certificates: vec![],
        federated_credentials: vec![],
        permissions: PermissionsSeed::default(),
    }
}

/// Builds the emulator's configuration for one tenant: resource groups,
/// identities, scale sets and VMs (in the node resource group), service
/// principals, clock and test CA. The fields of [`Config`] stay reachable
/// for anything else ([`Tenant::config_mut`], or change the built one).
#[derive(Clone, Debug)]
pub struct Tenant {
    config: Config,
    node_rg: String,
}

impl Tenant {
    /// [`TENANT`] and [`SUB`] with two resource groups, nothing else; scale
    /// sets and VMs go into `node_rg`.
    pub fn in_groups(node_rg: &str, app_rg: &str) -> Tenant {
        let mut config = Config::new(TENANT, SUB);
        config.resource_groups = vec![node_rg.into(), app_rg.into()];
        Tenant {
            config,
            node_rg: node_rg.into(),
        }
    }

    /// [`NODE_RG`] and [`APP_RG`], with MIC's service principal
    /// ([`MIC_CLIENT`], [`MIC_SECRET`]).
    pub fn new() -> Tenant {
        Tenant::in_groups(NODE_RG, APP_RG).service_principal(MIC_CLIENT, MIC_SECRET)
    }

    /// [`Tenant::new`] with the kubelet identity ([`KUBELET`] in
    /// [`NODE_RG`]), one pod identity ([`APP_ID`] in [`APP_RG`]) and the
    /// clock at [`FAST_CLOCK`].
    pub fn standard() -> Tenant {
        Tenant::new()
            .identity(KUBELET, NODE_RG, KUBELET_CLIENT)
            .identity(APP_ID, APP_RG, APP_CLIENT)
            .speed(FAST_CLOCK)
    }

    /// Adds a user-assigned identity.
    pub fn identity(mut self, name: &str, rg: &str, client_id: &str) -> Tenant {
        self.config
            .identities
            .push(identity_seed(name, rg, client_id));
        self
    }

    /// Adds a scale set in the node resource group with instances
    /// `0..instances` carrying `user_assigned`.
    pub fn scale_set(mut self, name: &str, instances: usize, user_assigned: &[&str]) -> Tenant {
        self.config.scale_sets.push(scale_set_seed(
            name,
            &self.node_rg,
            instances,
            user_assigned,
        ));
        self
    }

    /// Adds a standalone VM in the node resource group.
    pub fn vm(mut self, name: &str, system_assigned: bool, user_assigned: &[&str]) -> Tenant {
        self.config.virtual_machines.push(vm_seed(
            name,
            &self.node_rg,
            system_assigned,
            user_assigned,
        ));
        self
    }

    /// Adds a service principal with one plain secret.
    pub fn service_principal(mut self, client_id: &str, secret: &str) -> Tenant {
        self.config
            .service_principals
            .push(service_principal_seed(client_id, secret));
        self
    }

    /// Sets the emulator's clock speed (100: a 45 s write takes 0.45 s).
    pub fn speed(mut self, speed: f64) -> Tenant {
        self.config.clock.speed = speed;
        self
    }

    /// Serves HTTPS with a certificate of this test CA (PEM files), when
    /// given; otherwise the emulator makes a CA of its own.
    pub fn test_ca(mut self, ca: Option<(PathBuf, PathBuf)>) -> Tenant {
        let (cert, key) = ca.unzip();
        self.config.listen.ca_cert_pem_file = cert;
        self.config.listen.ca_key_pem_file = key;
        self
    }

    /// A tenant of `config` as it is (a test's own world), its scale sets
    /// and VMs added later going into `node_rg`.
    pub fn of_config(config: Config, node_rg: &str) -> Tenant {
        Tenant {
            config,
            node_rg: node_rg.into(),
        }
    }

    /// The configuration so far, to change what the builder does not cover.
    pub fn config_mut(&mut self) -> &mut Config {
        &mut self.config
    }

    /// The emulator's configuration.
    pub fn config(self) -> Config {
        self.config
    }

    /// Starts an emulator with this configuration.
    pub async fn start(self) -> anyhow::Result<Emulator> {
        Ok(Emulator::start(self.config).await?)
    }
}

impl Default for Tenant {
    fn default() -> Tenant {
        Tenant::new()
    }
}

/// What MIC's `azure.json` says: who MIC signs in as and where it writes.
/// Serialized as that file's fields (without `cloud`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MicCloud {
    pub tenant_id: String,
    pub subscription_id: String,
    /// The node resource group.
    pub resource_group: String,
    /// MIC's service principal.
    #[serde(rename = "aadClientId")]
    pub client_id: String,
    #[serde(rename = "aadClientSecret")]
    pub client_secret: String,
    /// `vmType` (`vmss`); left out when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_type: Option<String>,
    /// `userAssignedIdentityID`: the kubelet identity's client ID, which MIC
    /// never removes; left out when `None`.
    #[serde(
        rename = "userAssignedIdentityID",
        skip_serializing_if = "Option::is_none"
    )]
    pub user_assigned_identity_id: Option<String>,
}

impl MicCloud {
    /// [`TENANT`], [`SUB`], [`NODE_RG`], [`MIC_CLIENT`] with [`MIC_SECRET`],
    /// `vmss` and [`KUBELET_CLIENT`].
    pub fn standard() -> MicCloud {
        MicCloud {
            tenant_id: TENANT.into(),
            subscription_id: SUB.into(),
            resource_group: NODE_RG.into(),
            client_id: MIC_CLIENT.into(),
            client_secret: MIC_SECRET.into(),
            vm_type: Some("vmss".into()),
            user_assigned_identity_id: Some(KUBELET_CLIENT.into()),
        }
    }

    /// The `azure.json` document (cloud [`CUSTOM_CLOUD`]).
    pub fn azure_json(&self) -> Value {
        custom_cloud_document(self, "cloud")
    }

    /// Writes [`MicCloud::azure_json`] to `path`.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        write_json(path, &self.azure_json())
    }
}

impl Default for MicCloud {
    fn default() -> MicCloud {
        MicCloud::standard()
    }
}

/// The custom-cloud environment file (`AZURE_ENVIRONMENT_FILEPATH`): where
/// ARM and AAD are. Serialized as that file's fields (without `name`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudEnvironment {
    pub resource_manager_endpoint: String,
    pub active_directory_endpoint: String,
    /// `tokenAudience`; left out when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_audience: Option<String>,
}

impl CloudEnvironment {
    /// The emulator's ARM and AAD, with tokens for [`ARM_AUDIENCE`].
    pub fn of(emu: &Emulator) -> CloudEnvironment {
        CloudEnvironment::at(&emu.arm_url(), &emu.aad_url())
    }

    /// ARM and AAD at these URLs, with tokens for [`ARM_AUDIENCE`].
    pub fn at(arm_url: &str, aad_url: &str) -> CloudEnvironment {
        CloudEnvironment {
            resource_manager_endpoint: arm_url.into(),
            active_directory_endpoint: aad_url.into(),
            token_audience: Some(ARM_AUDIENCE.into()),
        }
    }

    /// The environment document (name [`CUSTOM_CLOUD`]).
    pub fn json(&self) -> Value {
        custom_cloud_document(self, "name")
    }

    /// Writes [`CloudEnvironment::json`] to `path`.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        write_json(path, &self.json())
    }
}

/// The JSON document of `fields` with `key` naming [`CUSTOM_CLOUD`].
fn custom_cloud_document(fields: &impl Serialize, key: &str) -> Value {
    let mut doc = json!(fields);
    doc[key] = json!(CUSTOM_CLOUD);
    doc
}

fn write_json(path: &Path, doc: &Value) -> anyhow::Result<()> {
    replace_file(path, doc.to_string().as_bytes())
}

/// Replaces `path` with `contents` in one step (written next to it, then
/// renamed over it), so a process that polls the file never reads it half
/// written: a rotation as a kubelet's volume update or an installer's
/// rename makes it, and what a test that counts the reader's reports needs.
pub fn replace_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, contents).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))
}

/// Where [`write_mic_cloud_files`] wrote MIC's two files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MicCloudFiles {
    /// `--cloudconfig`.
    pub azure_json: PathBuf,
    /// `AZURE_ENVIRONMENT_FILEPATH`.
    pub environment: PathBuf,
}

/// Writes `<dir>/<prefix>azure.json` and `<dir>/<prefix>cloud.json`.
pub fn write_mic_cloud_files(
    dir: &Path,
    prefix: &str,
    cloud: &MicCloud,
    env: &CloudEnvironment,
) -> anyhow::Result<MicCloudFiles> {
    let files = MicCloudFiles {
        azure_json: dir.join(format!("{prefix}azure.json")),
        environment: dir.join(format!("{prefix}cloud.json")),
    };
    env.write(&files.environment)?;
    cloud.write(&files.azure_json)?;
    Ok(files)
}

/// MIC's periods shortened for tests: a reconcile every 2 s and 100 ms
/// between retries of a refused identity write.
pub const MIC_TEST_PERIODS: [&str; 2] = [
    "--identity-assignment-reconcile-interval=2s",
    "--update-user-msi-retry-interval=100ms",
];

/// MIC's standard arguments (without the program name): its cloud config,
/// kubeconfig, and leader election as `instance` in `namespace`.
pub fn mic_args(
    files: &MicCloudFiles,
    kubeconfig: &Path,
    instance: &str,
    namespace: &str,
) -> Vec<String> {
    vec![
        format!("--cloudconfig={}", files.azure_json.display()),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--leader-election-instance={instance}"),
        format!("--leader-election-namespace={namespace}"),
    ]
}

/// MIC's environment: its namespace and the custom-cloud file.
pub fn mic_env(files: &MicCloudFiles, namespace: &str) -> Vec<(String, String)> {
    vec![
        (ENV_MIC_POD_NAMESPACE.into(), namespace.into()),
        (
            ENV_AZURE_ENVIRONMENT_FILEPATH.into(),
            files.environment.display().to_string(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_azure_json_has_every_field() {
        let doc = MicCloud::standard().azure_json();
        assert_eq!(doc["cloud"], CUSTOM_CLOUD);
        assert_eq!(doc["tenantId"], TENANT);
        assert_eq!(doc["aadClientId"], MIC_CLIENT);
        assert_eq!(doc["aadClientSecret"], MIC_SECRET);
        assert_eq!(doc["subscriptionId"], SUB);
        assert_eq!(doc["resourceGroup"], NODE_RG);
        assert_eq!(doc["vmType"], "vmss");
        assert_eq!(doc["userAssignedIdentityID"], KUBELET_CLIENT);
        assert_eq!(doc.as_object().map(|o| o.len()), Some(8), "{doc}");
    }

    #[test]
    fn optional_fields_are_left_out() {
        let cloud = MicCloud {
            vm_type: None,
            user_assigned_identity_id: None,
            ..MicCloud::standard()
        };
        let doc = cloud.azure_json();
        assert!(doc.get("vmType").is_none());
        assert!(doc.get("userAssignedIdentityID").is_none());
        let env = CloudEnvironment {
            token_audience: None,
            ..CloudEnvironment::at("https://arm", "https://aad")
        };
        assert_eq!(
            env.json(),
            json!({"name": CUSTOM_CLOUD, "resourceManagerEndpoint": "https://arm",
                   "activeDirectoryEndpoint": "https://aad"})
        );
    }

    #[test]
    fn provider_ids_lower_case_only_the_scale_set_group() {
        assert!(vmss_provider_id(NODE_RG, "ss", 1).ends_with(
            "/resourceGroups/mc_rg_cluster_eastus/providers/Microsoft.Compute/virtualMachineScaleSets/ss/virtualMachines/1"
        ));
        assert!(vm_provider_id(NODE_RG, "vm").ends_with(
            "/resourceGroups/MC_rg_cluster_eastus/providers/Microsoft.Compute/virtualMachines/vm"
        ));
    }

    #[test]
    fn tenant_builder_puts_machines_in_the_node_group() {
        let cfg = Tenant::standard()
            .scale_set("ss", 2, &[KUBELET])
            .vm("vm", true, &[])
            .config();
        assert_eq!(cfg.resource_groups, vec![NODE_RG, APP_RG]);
        assert_eq!(cfg.scale_sets[0].resource_group, NODE_RG);
        assert_eq!(cfg.scale_sets[0].instances, vec!["0", "1"]);
        assert_eq!(cfg.virtual_machines[0].resource_group, NODE_RG);
        assert!(cfg.virtual_machines[0].identity.system_assigned);
        assert_eq!(cfg.service_principals[0].client_id, MIC_CLIENT);
        assert_eq!(cfg.clock.speed, FAST_CLOCK);
    }

    #[test]
    fn mic_args_and_env() {
        let files = MicCloudFiles {
            azure_json: "/d/azure.json".into(),
            environment: "/d/cloud.json".into(),
        };
        assert_eq!(
            mic_args(&files, Path::new("/k"), "mic-0", "ns"),
            vec![
                "--cloudconfig=/d/azure.json",
                "--kubeconfig=/k",
                "--leader-election-instance=mic-0",
                "--leader-election-namespace=ns"
            ]
        );
        assert_eq!(
            mic_env(&files, "ns"),
            vec![
                ("MIC_POD_NAMESPACE".to_string(), "ns".to_string()),
                (
                    "AZURE_ENVIRONMENT_FILEPATH".to_string(),
                    "/d/cloud.json".to_string()
                )
            ]
        );
    }
}
