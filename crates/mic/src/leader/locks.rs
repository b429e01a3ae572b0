//! Reading and writing the two lock objects: upstream's Endpoints lock (the
//! record in an annotation, the rest of the object kept) and the Lease.
//! Every update carries the resourceVersion it read, so of two replicas
//! writing after the same read, one fails.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Endpoints;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::record::{ANNOTATION, Record};

/// Which object a lock is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Upstream v1.8.17's lock: `Endpoints` with the record in [`ANNOTATION`].
    Endpoints,
    /// A `coordination.k8s.io` Lease.
    Lease,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Endpoints => "endpoints",
            Kind::Lease => "lease",
        })
    }
}

/// One lock object, by namespace and name.
#[derive(Clone)]
pub struct Lock {
    pub kind: Kind,
    name: String,
    endpoints: Api<Endpoints>,
    leases: Api<Lease>,
}

/// A lock object as read (`None`: it does not exist).
pub enum Current {
    Endpoints(Option<Endpoints>),
    Lease(Option<Lease>),
}

impl Current {
    /// Its record; `None` when the object does not exist.
    pub fn record(&self) -> Option<Record> {
        match self {
            Current::Endpoints(e) => e.as_ref().map(|e| {
                Record::from_annotation(
                    e.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(ANNOTATION))
                        .map(String::as_str),
                )
            }),
            Current::Lease(l) => l.as_ref().map(|l| Record::from_lease(l.spec.as_ref())),
        }
    }
}

impl Lock {
    pub fn new(client: &Client, kind: Kind, namespace: &str, name: &str) -> Lock {
        Lock {
            kind,
            name: name.into(),
            endpoints: Api::namespaced(client.clone(), namespace),
            leases: Api::namespaced(client.clone(), namespace),
        }
    }

    pub async fn read(&self) -> Result<Current, kube::Error> {
        Ok(match self.kind {
            Kind::Endpoints => Current::Endpoints(self.endpoints.get_opt(&self.name).await?),
            Kind::Lease => Current::Lease(self.leases.get_opt(&self.name).await?),
        })
    }

    /// Writes `record` over what `current` read: creates the object when
    /// there was none, otherwise replaces it at the version read. Returns
    /// the record as stored (the Endpoints record keeps whole seconds).
    pub async fn write(&self, current: Current, record: &Record) -> Result<Record, kube::Error> {
        let named = || ObjectMeta {
            name: Some(self.name.clone()),
            ..Default::default()
        };
        let stored = match current {
            Current::Endpoints(read) => {
                let exists = read.is_some();
                let mut e = read.unwrap_or_else(|| Endpoints {
                    metadata: named(),
                    ..Default::default()
                });
                e.metadata
                    .annotations
                    .get_or_insert_with(BTreeMap::new)
                    .insert(ANNOTATION.into(), record.to_annotation());
                Current::Endpoints(Some(self.put(&self.endpoints, exists, &e).await?))
            }
            Current::Lease(read) => {
                let exists = read.is_some();
                let mut l = read.unwrap_or_else(|| Lease {
                    metadata: named(),
                    spec: None,
                });
                record.apply_to_lease(l.spec.get_or_insert_with(LeaseSpec::default));
                Current::Lease(Some(self.put(&self.leases, exists, &l).await?))
            }
        };
        Ok(stored.record().unwrap_or_default())
    }

    /// Replaces `object` at the version it was read at when it `exists`,
    /// otherwise creates it.
    async fn put<K>(&self, api: &Api<K>, exists: bool, object: &K) -> Result<K, kube::Error>
    where
        K: Clone + DeserializeOwned + Serialize + std::fmt::Debug,
    {
        let pp = PostParams::default();
        if exists {
            api.replace(&self.name, &pp, object).await
        } else {
            api.create(&pp, object).await
        }
    }
}
