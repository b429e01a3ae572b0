//! Step 9: the pods deleted; mic deletes their AzureAssignedIdentities and
//! removes the identities from the scale set and the VM (the kubelet
//! identity, which mic did not add, stays); the federated identity was on
//! no machine, so nothing is written for it.

use std::time::Instant;

use aadpodid_api::{AzureAssignedIdentity, TokenSource};
use anyhow::bail;
use azure_emulator::Emulator;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams};

use crate::say::{done, info, step};
use crate::steps::pods::{DemoPod, show_identities};
use crate::steps::wait;
use crate::tenant::Resource;

/// Deletes the pods and shows their identities released.
pub async fn delete_pods(client: &Client, emu: &Emulator, pods: &[DemoPod]) -> anyhow::Result<()> {
    let t = step(
        9,
        "Delete the pods: mic deletes their AzureAssignedIdentities and releases the identities",
    );
    let t_del = Instant::now();
    for p in pods {
        Api::<Pod>::namespaced(client.clone(), p.namespace)
            .delete(p.name, &DeleteParams::default().grace_period(0))
            .await?;
        info(&format!("pod {}/{} deleted", p.namespace, p.name));
    }
    let aais: Api<AzureAssignedIdentity> = Api::all(client.clone());
    for p in pods {
        wait("the AzureAssignedIdentity to be deleted", || {
            let aais = aais.clone();
            async move {
                let list = aais.list(&ListParams::default()).await.ok()?;
                (!list.items.iter().any(|a| p.owns(a))).then_some(())
            }
        })
        .await?;
        info(&format!(
            "AzureAssignedIdentity of {}/{}: gone (+{:.1}s)",
            p.namespace,
            p.name,
            t_del.elapsed().as_secs_f64()
        ));
    }
    for p in pods {
        if p.source == TokenSource::Federated {
            let note = format!(
                "  ({} was never on a machine: nothing to release)",
                p.identity
            );
            show_identities(emu, p.resource, &note).await?;
            continue;
        }
        let suffix = format!("/{}", p.identity.to_lowercase());
        wait(
            &format!("{} to leave {}", p.identity, p.resource.name()),
            || {
                let present = emu
                    .assigned_identities(p.resource.name())
                    .unwrap_or_default()
                    .iter()
                    .any(|i| i.to_lowercase().ends_with(&suffix));
                async move { (!present).then_some(()) }
            },
        )
        .await?;
        let note = format!(
            "  ({} released{})",
            p.identity,
            if p.resource == Resource::ScaleSet {
                "; the cluster's kubelet identity stays"
            } else {
                ""
            }
        );
        let ids = show_identities(emu, p.resource, &note).await?;
        if ids.iter().any(|i| i == p.identity) {
            bail!("{} is still on {}", p.identity, p.resource.name());
        }
    }
    done(t);
    Ok(())
}
