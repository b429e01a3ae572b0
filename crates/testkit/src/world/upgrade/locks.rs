//! The two leader records of one lock namespace and name, as a standby
//! reads them: upstream's Endpoints lock (client-go's record as JSON in
//! [`ENDPOINTS_ANNOTATION`]) and the `coordination.k8s.io` Lease.

use anyhow::Context as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Endpoints;
use kube::Client;
use kube::api::Api;

/// The annotation of upstream's Endpoints lock that holds the record.
pub const ENDPOINTS_ANNOTATION: &str = "control-plane.alpha.kubernetes.io/leader";

/// A lock's namespace and name (the Endpoints object and the Lease share
/// both) and a client to read it.
#[derive(Clone)]
pub struct LeaderLock {
    /// The reader.
    pub client: Client,
    /// `--leader-election-namespace`.
    pub namespace: String,
    /// `--leader-election-name`.
    pub name: String,
}

impl std::fmt::Debug for LeaderLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LeaderLock({}/{})", self.namespace, self.name)
    }
}

impl LeaderLock {
    /// The lock `namespace/name`, read with `client`.
    pub fn new(client: Client, namespace: &str, name: &str) -> LeaderLock {
        LeaderLock {
            client,
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The `--leader-election-name` flag of both mics.
    pub fn name_flag(&self) -> String {
        format!("--leader-election-name={}", self.name)
    }

    /// The Endpoints object, if there is one.
    pub async fn endpoints(&self) -> anyhow::Result<Option<Endpoints>> {
        Ok(
            Api::<Endpoints>::namespaced(self.client.clone(), &self.namespace)
                .get_opt(&self.name)
                .await?,
        )
    }

    /// The Endpoints record's raw annotation; `None` without object or
    /// annotation.
    pub async fn endpoints_annotation(&self) -> anyhow::Result<Option<String>> {
        Ok(self
            .endpoints()
            .await?
            .and_then(|e| e.metadata.annotations?.get(ENDPOINTS_ANNOTATION).cloned()))
    }

    /// The Endpoints record's holder: `None` without the object, `""` free
    /// (no record, or no holder in it).
    pub async fn endpoints_holder(&self) -> anyhow::Result<Option<String>> {
        let Some(e) = self.endpoints().await? else {
            return Ok(None);
        };
        let Some(text) = e
            .metadata
            .annotations
            .and_then(|a| a.get(ENDPOINTS_ANNOTATION).cloned())
        else {
            return Ok(Some(String::new()));
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("lock record {text}"))?;
        Ok(Some(
            v["holderIdentity"].as_str().unwrap_or_default().into(),
        ))
    }

    /// The Lease's holder: `None` without the object, `""` free.
    pub async fn lease_holder(&self) -> anyhow::Result<Option<String>> {
        Ok(
            Api::<Lease>::namespaced(self.client.clone(), &self.namespace)
                .get_opt(&self.name)
                .await?
                .map(|l| l.spec.and_then(|s| s.holder_identity).unwrap_or_default()),
        )
    }
}

/// A holder read by [`LeaderLock`], with a free lock as no holder.
pub(super) fn held(holder: Option<String>) -> Option<String> {
    holder.filter(|h| !h.is_empty())
}
