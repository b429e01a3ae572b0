//! The world's emulated tenant and the host files that point mic at it.

use std::path::{Path, PathBuf};

use super::{ADDON, ADDON_CLIENT, APP_RG, KUBELET, KUBELET_CLIENT, NODE_RG, Options};
use super::{id_client, id_name, vmss_name};
use crate::tenant::{
    self, CloudEnvironment, MIC_CLIENT, MIC_SECRET, MicCloud, MicCloudFiles, Tenant,
};

/// The tenant of `opts`: MIC's service principal, [`KUBELET`] (and [`ADDON`]
/// when asked) on every scale set, identities `id-0..` in [`APP_RG`]; a
/// caller adds its own machines or settings to it.
pub fn tenant_of(opts: &Options) -> Tenant {
    let mut t = Tenant::in_groups(NODE_RG, APP_RG)
        .service_principal(MIC_CLIENT, MIC_SECRET)
        .identity(KUBELET, NODE_RG, KUBELET_CLIENT);
    let mut on_nodes = vec![KUBELET];
    if opts.addon_identity {
        t = t.identity(ADDON, NODE_RG, ADDON_CLIENT);
        on_nodes.push(ADDON);
    }
    for j in 0..opts.identities + opts.unbound_identities {
        t = t.identity(&id_name(j), APP_RG, &id_client(j));
    }
    for s in 0..opts.scale_sets {
        t = t.scale_set(&vmss_name(s), opts.instances, &on_nodes);
    }
    t.speed(opts.clock_speed)
}

/// mic's azure.json in the world: the kit's standard one naming
/// [`KUBELET_CLIENT`] as the cluster's own identity.
pub(super) fn world_cloud() -> MicCloud {
    MicCloud {
        user_assigned_identity_id: Some(KUBELET_CLIENT.into()),
        ..MicCloud::standard()
    }
}

/// Host paths the rendered pod specs mount, as the chart's defaults name them.
const HOST_AZURE_JSON: &str = "/etc/kubernetes/azure.json";
const HOST_CUSTOM_CLOUD: &str = "/etc/kubernetes/akscustom.json";
const HOST_KUBELET_FLAGS: &str = "/etc/default/kubelet";

/// The files a node would hold, written into the world's folder.
#[derive(Debug)]
pub(super) struct HostFiles {
    /// MIC's `azure.json` (service principal, node resource group, kubelet
    /// identity) and the custom-cloud environment file (the emulator's ARM
    /// and Entra ID).
    files: MicCloudFiles,
    /// The kubelet's flags: Azure CNI, as upstream's e2e clusters
    /// (`--network-plugin azure`).
    kubelet_flags: PathBuf,
}

impl HostFiles {
    /// Writes them into `dir`, mic's azure.json from `cloud` and the
    /// custom-cloud file from `env`.
    pub(super) fn write(
        dir: &Path,
        cloud: &MicCloud,
        env: &CloudEnvironment,
    ) -> anyhow::Result<HostFiles> {
        let files = tenant::write_mic_cloud_files(dir, "", cloud, env)?;
        let kubelet_flags = dir.join("kubelet");
        std::fs::write(
            &kubelet_flags,
            "KUBELET_FLAGS=--network-plugin=cni --max-pods=110\n",
        )?;
        Ok(HostFiles {
            files,
            kubelet_flags,
        })
    }

    /// mic's two files (azure.json and the custom-cloud file).
    pub(super) fn mic_files(&self) -> &MicCloudFiles {
        &self.files
    }

    /// `s` with every host path the pod spec mounts replaced by the world's file.
    pub(super) fn substitute(&self, s: &str) -> String {
        [
            (HOST_AZURE_JSON, &self.files.azure_json),
            (HOST_CUSTOM_CLOUD, &self.files.environment),
            (HOST_KUBELET_FLAGS, &self.kubelet_flags),
        ]
        .iter()
        .fold(s.to_string(), |s, (from, to)| {
            s.replace(from, &to.display().to_string())
        })
    }
}

#[cfg(test)]
impl HostFiles {
    /// Files under `/w` (nothing written).
    pub(super) fn for_tests() -> HostFiles {
        HostFiles {
            files: MicCloudFiles {
                azure_json: "/w/azure.json".into(),
                environment: "/w/cloud.json".into(),
            },
            kubelet_flags: "/w/kubelet".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tenant_has_every_identity_and_scale_set_asked_for() {
        let mut opts = Options::new("/m", "/n");
        opts.addon_identity = true;
        opts.unbound_identities = 1;
        let cfg = tenant_of(&opts).config();
        let names: Vec<&str> = cfg.identities.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(
            names,
            [
                KUBELET, ADDON, "id-0", "id-1", "id-2", "id-3", "id-4", "id-5"
            ]
        );
        assert_eq!(cfg.scale_sets.len(), 2);
        for ss in &cfg.scale_sets {
            assert_eq!(ss.resource_group, NODE_RG);
            assert_eq!(ss.instances, ["0", "1"]);
            assert_eq!(ss.identity.user_assigned, [KUBELET, ADDON]);
        }
        assert_eq!(cfg.service_principals[0].client_id, MIC_CLIENT);
        assert_eq!(cfg.clock.speed, 30.0);
    }

    #[test]
    fn host_paths_become_the_world_files() {
        let files = HostFiles::for_tests();
        assert_eq!(
            files.substitute("--cloudconfig=/etc/kubernetes/azure.json"),
            "--cloudconfig=/w/azure.json"
        );
        assert_eq!(
            files.substitute("/etc/kubernetes/akscustom.json:/etc/default/kubelet"),
            "/w/cloud.json:/w/kubelet"
        );
        assert_eq!(files.substitute("--other"), "--other");
    }
}
