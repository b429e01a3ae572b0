//! Step 8: the real Python `azure-identity` `ManagedIdentityCredential` in
//! each pod's namespace gets a token through 169.254.169.254 (iptables in
//! the node sends it to nmi, nmi asks the node's IMDS); the token is verified
//! with the emulated Entra ID's key and its claims shown.

use aadpodid_testkit::netns::NetNs;
use aadpodid_testkit::world::WorldBuilder;
use aadpodid_testkit::{IdentitySelector, python_imds_token};
use anyhow::{Context as _, bail};

use crate::say::{done, info, step};
use crate::steps::pods::DemoPod;

/// Gets and checks one token per pod.
pub async fn show(world: &WorldBuilder, pods: &[DemoPod]) -> anyhow::Result<()> {
    let emu = world.emu()?;
    let t = step(
        8,
        "A real Azure SDK client in each pod gets a token through 169.254.169.254",
    );
    for p in pods {
        info(&format!(
            "{}/{}: python azure-identity ManagedIdentityCredential(client_id={}) in netns {}",
            p.namespace, p.name, p.client_id, p.netns
        ));
        let out = sdk_token(p.netns_in(world)?, &p.client_id)?;
        let token = out["token"]
            .as_str()
            .with_context(|| format!("the SDK got no token: {out}"))?;
        let claims = emu
            .verify_token(token)
            .map_err(|e| anyhow::anyhow!("token does not verify: {e:?}"))?;
        info(&format!(
            "  token: {} bytes, signature verified with the emulated Entra ID's key",
            token.len()
        ));
        info(&format!(
            "  claims: appid={} ({}), oid={}, tid={}, aud={}",
            claims.appid, p.identity, claims.oid, claims.tid, claims.aud
        ));
        info(&format!(
            "  expires_on={} (in {}h); path: pod -> iptables DNAT -> nmi on {} -> its IMDS",
            out["expires_on"],
            out["expires_on"]
                .as_u64()
                .map(|e| e.saturating_sub(unix_now()) / 3600)
                .unwrap_or_default(),
            p.node
        ));
        if !claims.appid.eq_ignore_ascii_case(&p.client_id) {
            bail!("the token is for {}, not {}", claims.appid, p.identity);
        }
    }
    done(t);
    Ok(())
}

/// The SDK's answer in the pod's namespace `netns`.
fn sdk_token(netns: &NetNs, client_id: &str) -> anyhow::Result<serde_json::Value> {
    tokio::task::block_in_place(|| {
        python_imds_token(
            None,
            "https://management.azure.com/.default",
            IdentitySelector::ClientId(client_id),
            Some(netns),
        )
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
