//! Step 8: the real Python `azure-identity` `ManagedIdentityCredential` in
//! each pod's namespace gets a token through 169.254.169.254 (iptables in
//! the node sends it to nmi, nmi asks the node's IMDS); the token is verified
//! with the emulated Entra ID's key and its claims shown. For the federated
//! pod nmi asks the API server for a token of the pod's ServiceAccount and
//! exchanges it at Entra ID instead. Then the pods side by side: source,
//! time to first token, ARM writes caused, claims.

use aadpodid_api::TokenSource;
use aadpodid_testkit::netns::NetNs;
use aadpodid_testkit::world::WorldBuilder;
use aadpodid_testkit::{IdentitySelector, python_imds_token};
use anyhow::{Context as _, bail};

use crate::say::{done, info, step};
use crate::steps::pods::DemoPod;
use crate::tenant::{CLOCK_SPEED, FED_SERVICE_ACCOUNT};

/// What the side-by-side table shows of one pod's token.
struct Seen {
    appid: String,
    oid: String,
    iss: String,
}

/// Gets and checks one token per pod, then shows the pods side by side.
pub async fn show(world: &WorldBuilder, pods: &[DemoPod]) -> anyhow::Result<()> {
    let emu = world.emu()?;
    let t = step(
        8,
        "A real Azure SDK client in each pod gets a token through 169.254.169.254",
    );
    let mut seen = Vec::new();
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
        let path = match p.source {
            TokenSource::Imds => format!("nmi on {} -> its IMDS", p.node),
            TokenSource::Federated => format!(
                "nmi on {} -> API server TokenRequest for ServiceAccount {}/{FED_SERVICE_ACCOUNT} (bound to the pod) -> Entra ID exchange",
                p.node, p.namespace
            ),
        };
        info(&format!(
            "  expires_on={} (in {} min); path: pod -> iptables DNAT -> {path}",
            out["expires_on"],
            out["expires_on"]
                .as_u64()
                .map(|e| e.saturating_sub(unix_now()) / 60)
                .unwrap_or_default(),
        ));
        if !claims.appid.eq_ignore_ascii_case(&p.client_id) {
            bail!("the token is for {}, not {}", claims.appid, p.identity);
        }
        let iss = azure_emulator::jwt::parse(token)
            .ok()
            .and_then(|t| t.claim_str("iss").map(str::to_string))
            .unwrap_or_default();
        seen.push(Seen {
            appid: claims.appid,
            oid: claims.oid,
            iss,
        });
    }
    side_by_side(pods, &seen);
    done(t);
    Ok(())
}

/// The pods side by side: one column each, as wide as its widest cell.
fn side_by_side(pods: &[DemoPod], seen: &[Seen]) {
    let rows: [(&str, Vec<String>); 7] = [
        (
            "pod",
            pods.iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect(),
        ),
        (
            "token source",
            pods.iter()
                .map(|p| match p.source {
                    TokenSource::Imds => format!("imds (on {})", p.resource.name()),
                    TokenSource::Federated => "federated".to_string(),
                })
                .collect(),
        ),
        (
            "first token",
            pods.iter()
                .map(|p| {
                    p.first_token.map_or("-".into(), |d| {
                        format!("{:.2} s after the Pod", d.as_secs_f64())
                    })
                })
                .collect(),
        ),
        (
            "ARM writes caused",
            pods.iter()
                .map(|p| p.arm_writes.map_or("-".into(), |n| n.to_string()))
                .collect(),
        ),
        ("appid", seen.iter().map(|s| s.appid.clone()).collect()),
        ("oid", seen.iter().map(|s| s.oid.clone()).collect()),
        ("iss", seen.iter().map(|s| s.iss.clone()).collect()),
    ];
    let widths: Vec<usize> = (0..pods.len())
        .map(|i| {
            rows.iter()
                .filter_map(|(_, cells)| cells.get(i).map(String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    info("");
    info("side by side:");
    for (label, cells) in &rows {
        let mut line = format!("  {label:<18}");
        for (c, w) in cells.iter().zip(&widths) {
            line.push_str(&format!("  {c:<w$}"));
        }
        info(line.trim_end());
    }
    info(&format!(
        "(first token: curl in the pod, polled from the Pod's creation; ARM's clock runs {CLOCK_SPEED}x here, so a 45 s scale-set write takes {:.1} s)",
        45.0 / CLOCK_SPEED
    ));
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
