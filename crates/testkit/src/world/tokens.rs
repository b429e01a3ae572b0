//! Token requests from inside the world's pods, as an application makes them
//! to 169.254.169.254: with curl, or with the real Python Azure SDK.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

use super::processes::{curl_command, curl_in, run_curl};
use super::{PodRef, TOKEN_PATH, World, id_client};
use crate::netns::IMDS_ADDRESS;
use crate::{IdentitySelector, python_imds_token};

/// The `access_token` of a token answer's JSON `body` (IMDS or Entra ID).
pub fn access_token(body: &str) -> anyhow::Result<String> {
    let v: Value = serde_json::from_str(body).with_context(|| format!("not JSON: {body}"))?;
    v["access_token"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no access_token: {body}"))
}

impl World {
    /// A token request from inside the pod with curl, as an app would make it
    /// to 169.254.169.254: (status, body).
    pub async fn curl_token(&self, p: &PodRef, max_time: u32) -> anyhow::Result<(u16, String)> {
        self.token_request(p, "", max_time).await
    }

    /// A token request from inside the pod with curl, with `query` appended
    /// to [`TOKEN_PATH`] (for example `&client_id=...`): (status, body);
    /// status 0 when no answer came within `max_time` seconds.
    pub async fn token_request(
        &self,
        p: &PodRef,
        query: &str,
        max_time: u32,
    ) -> anyhow::Result<(u16, String)> {
        curl_in(
            self.pod_ns(p)?,
            &format!("http://{IMDS_ADDRESS}{TOKEN_PATH}{query}"),
            &["Metadata: true"],
            max_time,
        )
        .await
    }

    /// The `appid` of a token, verified with the emulator's signing key.
    fn verified_appid(&self, token: &str) -> anyhow::Result<String> {
        Ok(self
            .emu
            .verify_token(token)
            .map_err(|e| anyhow::anyhow!("token does not verify: {e:?}"))?
            .appid)
    }

    /// The `appid` of the token in a successful IMDS answer, verified with
    /// the emulator's signing key.
    pub fn appid_of(&self, body: &str) -> anyhow::Result<String> {
        self.verified_appid(&access_token(body)?)
    }

    /// Asks for a token from every pod (all at once, as the apps would) and
    /// checks each gets its own identity's token.
    pub async fn check_tokens(&self, pods: &[PodRef]) -> anyhow::Result<()> {
        let failures = self.token_failures(pods).await?;
        if !failures.is_empty() {
            bail!(
                "{} of {} pods did not get their token:\n{}\n{}",
                failures.len(),
                pods.len(),
                failures.join("\n"),
                self.dump().await
            );
        }
        Ok(())
    }

    /// [`World::check_tokens`] again every 500 ms until every pod gets its
    /// token, for at most `timeout` (an identity put on a scale set reaches its
    /// instances' IMDS only when the scale-set write completes).
    pub async fn wait_tokens(&self, pods: &[PodRef], timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let failures = self.token_failures(pods).await?;
            if failures.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "after {timeout:?}, {} of {} pods still get no token:\n{}\n{}",
                    failures.len(),
                    pods.len(),
                    failures.join("\n"),
                    self.dump().await
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The pods that did not get their identity's token, with what they got.
    pub(super) async fn token_failures(&self, pods: &[PodRef]) -> anyhow::Result<Vec<String>> {
        let url = format!("http://{IMDS_ADDRESS}{TOKEN_PATH}");
        let mut set = tokio::task::JoinSet::new();
        for p in pods {
            let cmd = curl_command(Some(self.pod_ns(p)?), &url, &["Metadata: true"], 30);
            let p = p.clone();
            set.spawn(async move { (p, run_curl(cmd).await) });
        }
        let mut failures = Vec::new();
        while let Some(r) = set.join_next().await {
            let (p, answer) = r?;
            let (code, body) = answer?;
            let want = p.identity.map(id_client);
            let got = if code == 200 {
                self.appid_of(&body).ok()
            } else {
                None
            };
            if got.is_none() || got != want {
                failures.push(format!("{} ({}): {code} {body}", p.name, p.ip));
            }
        }
        Ok(failures)
    }

    /// A token through the real Python `azure-identity`
    /// `ManagedIdentityCredential` run inside the pod (by `client_id` when
    /// given); returns the token's verified `appid`.
    pub async fn python_token_appid(
        &self,
        p: &PodRef,
        client_id: Option<&str>,
    ) -> anyhow::Result<String> {
        let ns = self.pod_ns(p)?;
        let selector = client_id.map_or(IdentitySelector::Default, IdentitySelector::ClientId);
        let out = tokio::task::block_in_place(|| {
            python_imds_token(
                None,
                "https://management.azure.com/.default",
                selector,
                Some(ns),
            )
        })?;
        let token = out["token"]
            .as_str()
            .with_context(|| format!("{}/{}: the SDK got no token: {out}", p.namespace, p.name))?;
        self.verified_appid(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_token_of_an_answer() {
        assert_eq!(
            access_token(r#"{"access_token":"t","expires_in":"3599"}"#).unwrap(),
            "t"
        );
        assert!(access_token(r#"{"error":"invalid_request"}"#).is_err());
        assert!(access_token("not json").is_err());
    }
}
