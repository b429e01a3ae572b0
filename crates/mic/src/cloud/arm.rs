//! [`Cloud`] over ARM: a small typed client on `azure_core`'s `Pipeline` with
//! `azure_identity` credentials (the legacy
//! `azure_mgmt_compute` cannot represent user-assigned identities and pins an
//! `azure_core` that cannot mix with `azure_identity` 1.x).

use std::sync::Arc;
use std::time::Duration;

use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::TokenCredential;
use azure_core::http::headers::{HeaderName, Headers, USER_AGENT};
use azure_core::http::policies::auth::BearerTokenAuthorizationPolicy;
use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{
    ClientOptions, Context, Method, Pipeline, PipelineSendOptions, RawResponse, Request,
    RetryOptions, Url,
};
use azure_identity::{
    ClientSecretCredential, ClientSecretCredentialOptions, ManagedIdentityCredential,
    ManagedIdentityCredentialOptions, UserAssignedId,
};
use serde::Deserialize;

use super::config::{CloudConfig, CredentialConfig};
use super::poll::{Endings, PollPolicy, Progress, next_delay};
use super::{
    ArmError, ArmIdentity, Cloud, CloudError, IdentityPatch, ResourceIdentity, ResourceKind,
    ResourceRef, normalize_id,
};

/// Compute api-version MIC sends to Azure's public and sovereign clouds
/// (widely deployed, has ETags, same identity schema as upstream's 2019-12-01).
pub const COMPUTE_API_VERSION: &str = "2024-11-01";
/// Compute api-version MIC sends to Azure Stack Hub (`AzureStackCloud`):
/// the one the Azure SDK's newest Azure Stack profile (2020-09-01-hybrid)
/// uses for virtualMachines and virtualMachineScaleSets. Azure Stack Hub
/// serves no public-cloud api-version newer than its profiles.
pub const AZURE_STACK_COMPUTE_API_VERSION: &str = "2020-06-01";

/// The Compute api-version for `cloud` (azure.json's `cloud`, compared as
/// go-autorest does, ignoring case): `flag` (`--compute-api-version`) when
/// set, else [`AZURE_STACK_COMPUTE_API_VERSION`] for `AzureStackCloud` and
/// [`COMPUTE_API_VERSION`] for every other cloud.
pub fn compute_api_version(cloud: &str, flag: Option<&str>) -> String {
    match flag.filter(|f| !f.is_empty()) {
        Some(f) => f.to_string(),
        None if cloud.eq_ignore_ascii_case("AzureStackCloud") => {
            AZURE_STACK_COMPUTE_API_VERSION.to_string()
        }
        None => COMPUTE_API_VERSION.to_string(),
    }
}

/// Upstream polls LROs every 5 s when ARM gives no Retry-After.
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// go-autorest's default PollingDuration, which upstream keeps.
const DEFAULT_POLL_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Settings of the client that are not in the cloud config.
#[derive(Clone, Debug)]
pub struct ArmOptions {
    /// `aad-pod-identity/MIC/<version>[ <custom>]`; the SDK adds its own part.
    pub user_agent: String,
    /// Spacing of LRO polls while ARM has sent no `Retry-After` for the
    /// operation and no earlier operation of its kind says when it ends
    /// ([`PollPolicy::fallback`]).
    pub poll_interval: Duration,
    pub poll_timeout: Duration,
    /// `--compute-api-version`; `None` or empty: the cloud's own
    /// ([`compute_api_version`]).
    pub compute_api_version: Option<String>,
    /// The azure.json the cloud config came from, looked at again before
    /// each ARM read or write; `None`: the config never changes.
    pub reload: Option<CloudConfigFile>,
}

impl Default for ArmOptions {
    fn default() -> Self {
        ArmOptions {
            user_agent: String::new(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            poll_timeout: DEFAULT_POLL_TIMEOUT,
            compute_api_version: None,
            reload: None,
        }
    }
}

/// Where the cloud config is re-read from when azure.json changes.
#[derive(Clone, Debug)]
pub struct CloudConfigFile {
    /// `--cloudconfig`.
    pub path: std::path::PathBuf,
    /// `AZURE_ENVIRONMENT_FILEPATH` as it was at start.
    pub environment_file: Option<String>,
}

/// Everything a request is built from; replaced as a whole when azure.json
/// changes (upstream MIC made new ARM clients when it re-read the file).
#[derive(Debug)]
struct Connection {
    pipeline: Pipeline,
    base: Url,
    subscription_id: String,
    resource_group: String,
    api_version: String,
}

/// The azure.json being watched.
#[derive(Debug)]
struct Reloader {
    file: aadpodid_runtime::azure_json::WatchedFile,
    environment_file: Option<String>,
}

/// ARM compute client for one subscription and resource group.
#[derive(Debug)]
pub struct ArmCloud {
    connection: std::sync::RwLock<Arc<Connection>>,
    reloader: Option<std::sync::Mutex<Reloader>>,
    options: ArmOptions,
    /// Last `x-ms-ratelimit-remaining-resource` per resource, from GET and
    /// write answers.
    remaining: std::sync::Mutex<std::collections::BTreeMap<ResourceRef, String>>,
    /// Last `x-ms-ratelimit-remaining-subscription-writes`, from write answers.
    subscription_writes: std::sync::Mutex<Option<u64>>,
    /// When recent operations ended, per kind of resource: where the poll
    /// schedule looks closely.
    endings: std::sync::Mutex<std::collections::BTreeMap<ResourceKind, Endings>>,
}

fn client_options(config: &CloudConfig) -> ClientOptions {
    let mut custom = CustomConfiguration::default();
    custom.authority_host = config.endpoints.active_directory.clone();
    ClientOptions {
        cloud: Some(Arc::new(CloudConfiguration::Custom(custom))),
        ..Default::default()
    }
}

/// The credential upstream would pick for this config: the managed identity
/// when `useManagedIdentityExtension` is set (user-assigned if
/// `userAssignedIdentityID` is given, else system-assigned), otherwise the
/// service principal.
pub fn credential(config: &CloudConfig) -> Result<Arc<dyn TokenCredential>, CloudError> {
    let build = |e: azure_core::Error| CloudError::BuildClient {
        message: e.to_string(),
    };
    Ok(match &config.credential {
        CredentialConfig::ServicePrincipal { client_id, secret } => {
            let options = ClientSecretCredentialOptions {
                client_options: client_options(config),
            };
            ClientSecretCredential::new(
                &config.tenant_id,
                client_id.clone(),
                secret.clone(),
                Some(options),
            )
            .map_err(build)?
        }
        CredentialConfig::SystemAssignedMsi => {
            ManagedIdentityCredential::new(None).map_err(build)?
        }
        CredentialConfig::UserAssignedMsi { client_id } => {
            let options = ManagedIdentityCredentialOptions {
                user_assigned_id: Some(UserAssignedId::ClientId(client_id.clone())),
                ..Default::default()
            };
            ManagedIdentityCredential::new(Some(options)).map_err(build)?
        }
    })
}

#[derive(Deserialize)]
struct ResourceBody {
    #[serde(default)]
    identity: Option<IdentityBody>,
    #[serde(default)]
    properties: Option<PropertiesBody>,
}

#[derive(Deserialize)]
struct IdentityBody {
    #[serde(rename = "type", default)]
    type_: String,
    #[serde(rename = "userAssignedIdentities", default)]
    user_assigned: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Deserialize)]
struct PropertiesBody {
    #[serde(rename = "provisioningState", default)]
    provisioning_state: String,
}

#[derive(Deserialize)]
struct CloudErrorBody {
    error: CloudErrorInner,
}

#[derive(Deserialize)]
struct CloudErrorInner {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct AsyncOperationBody {
    #[serde(default)]
    status: String,
    #[serde(default)]
    error: Option<CloudErrorInner>,
}

const RETRY_AFTER: HeaderName = HeaderName::from_static("retry-after");
const REMAINING_RESOURCE: HeaderName = HeaderName::from_static("x-ms-ratelimit-remaining-resource");
const REMAINING_SUBSCRIPTION_WRITES: HeaderName =
    HeaderName::from_static("x-ms-ratelimit-remaining-subscription-writes");
const ASYNC_OPERATION: HeaderName = HeaderName::from_static("azure-asyncoperation");
const LOCATION: HeaderName = HeaderName::from_static("location");

/// `Retry-After` as seconds or an HTTP date (both allowed by RFC 9110).
pub fn parse_retry_after(value: &str, now: k8s_openapi::jiff::Timestamp) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = k8s_openapi::jiff::fmt::rfc2822::parse(value).ok()?;
    let secs = at.timestamp().as_second() - now.as_second();
    Some(Duration::from_secs(secs.max(0).unsigned_abs()))
}

fn retry_after(headers: &Headers) -> Option<Duration> {
    headers
        .get_optional_str(&RETRY_AFTER)
        .and_then(|v| parse_retry_after(v, k8s_openapi::jiff::Timestamp::now()))
}

fn arm_error(resp: &RawResponse) -> ArmError {
    let status = u16::from(resp.status());
    let (code, message) = match serde_json::from_slice::<CloudErrorBody>(resp.body()) {
        Ok(b) => (b.error.code, b.error.message),
        Err(_) => (
            format!("HTTP{status}"),
            String::from_utf8_lossy(resp.body())
                .chars()
                .take(500)
                .collect(),
        ),
    };
    ArmError {
        status: Some(status),
        code,
        message,
        retry_after: retry_after(resp.headers()),
    }
}

fn transport_error(e: &azure_core::Error) -> ArmError {
    ArmError {
        status: None,
        code: format!("{:?}", e.kind()),
        message: e.to_string(),
        retry_after: None,
    }
}

/// Puts MIC's whole User-Agent (`aad-pod-identity/MIC/<version>[ <custom>]`,
/// upstream's form) in front of the one
/// the SDK sets. The SDK's own `application_id` cannot carry it: it panics on
/// more than 24 characters or on anything but an RFC 9110 token, and `/` is
/// none. A per-try policy, so it runs after the SDK's User-Agent policy.
#[derive(Debug)]
struct FullUserAgent {
    prefix: String,
}

/// `prefix` then the SDK's part, with control characters (which no header
/// may carry) made spaces.
pub fn full_user_agent(prefix: &str, sdk: Option<&str>) -> String {
    let whole = match sdk {
        Some(sdk) if !sdk.is_empty() => format!("{prefix} {sdk}"),
        _ => prefix.to_string(),
    };
    whole
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl Policy for FullUserAgent {
    fn send<'a, 'b, 'c, 'd, 't>(
        &'a self,
        ctx: &'b Context,
        request: &'c mut Request,
        next: &'d [Arc<dyn Policy>],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = PolicyResult> + Send + 't>>
    where
        'a: 't,
        'b: 't,
        'c: 't,
        'd: 't,
        Self: 't,
    {
        Box::pin(async move {
            let value = full_user_agent(
                &self.prefix,
                request.headers().get_optional_str(&USER_AGENT),
            );
            request.insert_header(USER_AGENT, value);
            match next.split_first() {
                Some((first, rest)) => first.send(ctx, request, rest).await,
                None => Err(azure_core::Error::with_message(
                    azure_core::error::ErrorKind::Other,
                    "no policy after the User-Agent policy",
                )),
            }
        })
    }
}

impl ArmCloud {
    /// A client for `config`. With [`ArmOptions::reload`], azure.json is
    /// watched from now on: a new version that parses replaces the
    /// credential, endpoints, subscription and resource group before the
    /// next ARM read or write; one that does not is logged once and the
    /// previous configuration stays.
    pub fn new(config: &CloudConfig, options: ArmOptions) -> Result<Self, CloudError> {
        let cred = credential(config)?;
        let mut cloud = Self::with_credential(config, cred, options)?;
        if let Some(source) = cloud.options.reload.clone() {
            let build = |message: String| CloudError::BuildClient { message };
            let (file, text) = aadpodid_runtime::azure_json::WatchedFile::open(&source.path)
                .map_err(|e| build(e.to_string()))?;
            // The connection comes from the version being watched, so no
            // rewrite between the caller's read and this one is missed.
            let path = source.path.display().to_string();
            let connection = cloud
                .reconnect(&path, &text, source.environment_file.clone())
                .map_err(build)?;
            cloud.connection = std::sync::RwLock::new(Arc::new(connection));
            cloud.reloader = Some(std::sync::Mutex::new(Reloader {
                file,
                environment_file: source.environment_file,
            }));
        }
        Ok(cloud)
    }

    /// A client with a given credential, never reloaded (tests).
    pub fn with_credential(
        config: &CloudConfig,
        cred: Arc<dyn TokenCredential>,
        options: ArmOptions,
    ) -> Result<Self, CloudError> {
        let connection = Self::connect(config, cred, &options)?;
        Ok(ArmCloud {
            connection: std::sync::RwLock::new(Arc::new(connection)),
            reloader: None,
            options,
            remaining: std::sync::Mutex::default(),
            subscription_writes: std::sync::Mutex::default(),
            endings: std::sync::Mutex::default(),
        })
    }

    /// The Compute api-version requests carry now.
    pub fn api_version(&self) -> String {
        self.current().api_version.clone()
    }

    fn current(&self) -> Arc<Connection> {
        self.connection
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Looks at azure.json (a stat; a read only when it changed) and moves
    /// to its new version when that parses; the connection to use.
    fn refreshed(&self) -> Arc<Connection> {
        if let Some(reloader) = &self.reloader {
            let mut r = reloader.lock().unwrap_or_else(|p| p.into_inner());
            let path = r.file.path().display().to_string();
            match r.file.poll() {
                aadpodid_runtime::azure_json::Poll::Unchanged => {}
                aadpodid_runtime::azure_json::Poll::Vanished(error) => {
                    tracing::error!(path, %error, "azure.json is gone; keeping the configuration read before");
                }
                aadpodid_runtime::azure_json::Poll::Unreadable(error) => {
                    tracing::error!(path, %error, "azure.json changed but cannot be read; keeping the configuration read before");
                }
                aadpodid_runtime::azure_json::Poll::Changed(text) => {
                    let env = r.environment_file.clone();
                    match self.reconnect(&path, &text, env) {
                        Ok(connection) => {
                            tracing::info!(
                                path,
                                api_version = %connection.api_version,
                                subscription = %connection.subscription_id,
                                resource_group = %connection.resource_group,
                                "azure.json changed: ARM client rebuilt from it"
                            );
                            *self.connection.write().unwrap_or_else(|p| p.into_inner()) =
                                Arc::new(connection);
                        }
                        Err(error) => {
                            tracing::error!(path, %error, "azure.json changed but is not usable; keeping the configuration read before");
                        }
                    }
                }
            }
        }
        self.current()
    }

    fn reconnect(
        &self,
        path: &str,
        text: &str,
        environment_file: Option<String>,
    ) -> Result<Connection, String> {
        let env = move |k: &str| {
            (k == super::config::ENV_AZURE_ENVIRONMENT_FILEPATH)
                .then(|| environment_file.clone())
                .flatten()
        };
        let read_file = |p: &str| {
            aadpodid_runtime::azure_json::read_bounded(std::path::Path::new(p))
                .map_err(|e| e.to_string())
        };
        let config =
            super::config::load(Some((path, text)), &env, &read_file).map_err(|e| e.to_string())?;
        let cred = credential(&config).map_err(|e| e.to_string())?;
        Self::connect(&config, cred, &self.options).map_err(|e| e.to_string())
    }

    fn connect(
        config: &CloudConfig,
        cred: Arc<dyn TokenCredential>,
        options: &ArmOptions,
    ) -> Result<Connection, CloudError> {
        let base = Url::parse(&config.endpoints.resource_manager).map_err(|e| {
            CloudError::BuildClient {
                message: format!("ARM endpoint {}: {e}", config.endpoints.resource_manager),
            }
        })?;
        let bearer = BearerTokenAuthorizationPolicy::new(cred, [config.endpoints.arm_scope()]);
        let mut client_options = client_options(config);
        // MIC decides about retries per scale set (Retry-After pauses only the
        // throttled resource, where upstream paused every scale set:
        // docs/upstream-behaviour.md#h8-one-throttle-for-all-scale-sets); the
        // SDK must not sleep on a 429 inside a call, as upstream's did not.
        client_options.retry = RetryOptions::none();
        let mut per_try: Vec<Arc<dyn Policy>> = vec![Arc::new(bearer)];
        if !options.user_agent.is_empty() {
            per_try.push(Arc::new(FullUserAgent {
                prefix: options.user_agent.clone(),
            }));
        }
        let pipeline = Pipeline::new(
            Some("mic"),
            Some(env!("CARGO_PKG_VERSION")),
            client_options,
            vec![],
            per_try,
            None,
        );
        Ok(Connection {
            pipeline,
            base,
            subscription_id: config.subscription_id.clone(),
            resource_group: config.resource_group.clone(),
            api_version: compute_api_version(&config.cloud, options.compute_api_version.as_deref()),
        })
    }

    fn resource_url(c: &Connection, r: &ResourceRef) -> Result<Url, ArmError> {
        let kind = match r.kind {
            ResourceKind::Vmss => "virtualMachineScaleSets",
            ResourceKind::Vm => "virtualMachines",
        };
        let path = format!(
            "subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/{kind}/{}",
            c.subscription_id, c.resource_group, r.name
        );
        let mut url = c.base.join(&path).map_err(|e| ArmError {
            status: None,
            code: "InvalidUrl".into(),
            message: e.to_string(),
            retry_after: None,
        })?;
        url.query_pairs_mut()
            .append_pair("api-version", &c.api_version);
        Ok(url)
    }

    async fn send(
        c: &Connection,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ArmError> {
        let mut req = Request::new(url, method);
        if let Some(b) = body {
            req.insert_header("content-type", "application/json");
            req.set_body(b);
        }
        let options = PipelineSendOptions {
            skip_checks: true,
            ..Default::default()
        };
        c.pipeline
            .send(&Context::new(), &mut req, Some(options))
            .await
            .map_err(|e| transport_error(&e))
    }

    /// Keeps what an answer about `r` says of the Compute buckets for the
    /// scheduler (every Compute answer carries it).
    fn note_remaining(&self, r: &ResourceRef, resp: &RawResponse) {
        if let Some(v) = resp.headers().get_optional_str(&REMAINING_RESOURCE) {
            self.remaining
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(r.clone(), v.to_string());
        }
    }

    async fn get(&self, r: &ResourceRef) -> Result<ResourceIdentity, ArmError> {
        let c = self.refreshed();
        let resp = Self::send(&c, Method::Get, Self::resource_url(&c, r)?, None).await?;
        self.note_remaining(r, &resp);
        if !resp.status().is_success() {
            return Err(arm_error(&resp));
        }
        let body: ResourceBody = serde_json::from_slice(resp.body()).map_err(|e| ArmError {
            status: Some(u16::from(resp.status())),
            code: "InvalidResponse".into(),
            message: e.to_string(),
            retry_after: None,
        })?;
        let identity = body.identity.unwrap_or(IdentityBody {
            type_: String::new(),
            user_assigned: None,
        });
        let user_assigned = identity.user_assigned.unwrap_or_default();
        Ok(ResourceIdentity {
            type_: identity.type_,
            user_assigned: user_assigned.keys().map(|k| normalize_id(k)).collect(),
            provisioning_state: body
                .properties
                .map(|p| p.provisioning_state)
                .unwrap_or_default(),
            reported: reported_identities(&user_assigned),
        })
    }

    async fn patch(&self, r: &ResourceRef, patch: &IdentityPatch) -> Result<(), ArmError> {
        let body = serde_json::to_vec(patch).map_err(|e| ArmError {
            status: None,
            code: "InvalidRequest".into(),
            message: e.to_string(),
            retry_after: None,
        })?;
        let c = self.refreshed();
        let resp = Self::send(&c, Method::Patch, Self::resource_url(&c, r)?, Some(body)).await?;
        self.note_remaining(r, &resp);
        if let Some(n) = resp
            .headers()
            .get_optional_str(&REMAINING_SUBSCRIPTION_WRITES)
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            *self
                .subscription_writes
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(n);
        }
        if !resp.status().is_success() {
            return Err(arm_error(&resp));
        }
        self.wait_for_completion(&c, &resp, r.kind).await
    }

    /// The poll schedule's settings.
    fn poll_policy(&self) -> PollPolicy {
        let default = PollPolicy::default();
        PollPolicy {
            fallback: self.options.poll_interval,
            min_spacing: default.min_spacing.min(self.options.poll_interval),
            ..default
        }
    }

    /// Where operations on `kind` ended lately.
    fn window(&self, kind: ResourceKind) -> Option<(Duration, Duration)> {
        self.endings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&kind)
            .and_then(Endings::window)
    }

    fn record_ending(&self, kind: ResourceKind, running: Duration, ended: Duration) {
        self.endings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kind)
            .or_default()
            .record(running, ended);
    }

    /// Follows `Azure-AsyncOperation` (preferred by Compute) or `Location`
    /// until the operation ends (`Location` answers 202 while it runs), at
    /// the times [`next_delay`] picks. Bounded by the poll timeout.
    async fn wait_for_completion(
        &self,
        c: &Connection,
        first: &RawResponse,
        kind: ResourceKind,
    ) -> Result<(), ArmError> {
        let (url, by_location) = match (
            first.headers().get_optional_str(&ASYNC_OPERATION),
            first.headers().get_optional_str(&LOCATION),
        ) {
            (Some(op), _) => (op.to_string(), false),
            (None, Some(loc)) => (loc.to_string(), true),
            (None, None) => return Ok(()),
        };
        let url = Url::parse(&url).map_err(|e| ArmError {
            status: None,
            code: "InvalidResponse".into(),
            message: format!("operation URL {url}: {e}"),
            retry_after: None,
        })?;
        let accepted = tokio::time::Instant::now();
        let deadline = accepted + self.options.poll_timeout;
        let policy = self.poll_policy();
        let hint = retry_after(first.headers());
        let mut progress = Progress {
            elapsed: Duration::ZERO,
            retry_after: hint,
            last_hint: hint,
        };
        // When a poll last found the operation running.
        let mut running = Duration::ZERO;
        loop {
            progress.elapsed = accepted.elapsed();
            let delay = next_delay(&policy, &progress, self.window(kind));
            if tokio::time::Instant::now() + delay > deadline {
                return Err(ArmError {
                    status: None,
                    code: "OperationTimedOut".into(),
                    message: format!("no result after {:?}", self.options.poll_timeout),
                    retry_after: None,
                });
            }
            tokio::time::sleep(delay).await;
            let sent = accepted.elapsed();
            let resp = Self::send(c, Method::Get, url.clone(), None).await?;
            let answered = accepted.elapsed();
            let status = u16::from(resp.status());
            let ended = |this: &Self| this.record_ending(kind, running, answered);
            if by_location {
                match status {
                    202 => {}
                    200..=299 => {
                        ended(self);
                        return Ok(());
                    }
                    _ => return Err(arm_error(&resp)),
                }
            } else {
                if !resp.status().is_success() {
                    return Err(arm_error(&resp));
                }
                let body: AsyncOperationBody =
                    serde_json::from_slice(resp.body()).map_err(|e| ArmError {
                        status: Some(status),
                        code: "InvalidResponse".into(),
                        message: e.to_string(),
                        retry_after: None,
                    })?;
                match body.status.as_str() {
                    "Succeeded" => {
                        ended(self);
                        return Ok(());
                    }
                    "Failed" | "Canceled" => {
                        ended(self);
                        let inner = body.error.unwrap_or(CloudErrorInner {
                            code: body.status.clone(),
                            message: String::new(),
                        });
                        return Err(ArmError {
                            status: Some(status),
                            code: inner.code,
                            message: inner.message,
                            retry_after: None,
                        });
                    }
                    _ => {}
                }
            }
            running = sent;
            progress.retry_after = retry_after(resp.headers());
            if progress.retry_after.is_some() {
                progress.last_hint = progress.retry_after;
            }
        }
    }
}

/// ARM's `clientId`/`principalId` of each user-assigned identity in a GET
/// answer, keyed by the lower-cased identity ID. Values that are not
/// strings are taken as absent.
fn reported_identities(
    user_assigned: &serde_json::Map<String, serde_json::Value>,
) -> std::collections::BTreeMap<String, ArmIdentity> {
    let field = |v: &serde_json::Value, name: &str| {
        v.get(name)
            .and_then(serde_json::Value::as_str)
            .map(str::to_lowercase)
            .unwrap_or_default()
    };
    user_assigned
        .iter()
        .map(|(id, v)| {
            (
                normalize_id(id),
                ArmIdentity {
                    client_id: field(v, "clientId"),
                    principal_id: field(v, "principalId"),
                },
            )
        })
        .filter(|(_, a)| !(a.client_id.is_empty() && a.principal_id.is_empty()))
        .collect()
}

impl Cloud for ArmCloud {
    fn take_remaining(&self, resource: &ResourceRef) -> Option<String> {
        self.remaining
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(resource)
    }

    fn take_remaining_subscription_writes(&self) -> Option<u64> {
        self.subscription_writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    async fn get_identities(&self, resource: &ResourceRef) -> Result<ResourceIdentity, CloudError> {
        self.get(resource)
            .await
            .map_err(|source| CloudError::GetIdentities {
                resource: resource.clone(),
                source,
            })
    }

    async fn update_identities(
        &self,
        resource: &ResourceRef,
        patch: &IdentityPatch,
    ) -> Result<(), CloudError> {
        self.patch(resource, patch)
            .await
            .map_err(|source| CloudError::UpdateIdentities {
                resource: resource.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_api_version_per_cloud_and_flag() {
        let cases = [
            ("AzurePublicCloud", None, "2024-11-01"),
            ("AzureCloud", None, "2024-11-01"),
            ("AzureChinaCloud", None, "2024-11-01"),
            ("AzureUSGovernmentCloud", None, "2024-11-01"),
            ("AzureStackCloud", None, "2020-06-01"),
            ("azurestackcloud", None, "2020-06-01"),
            ("AZURESTACKCLOUD", Some(""), "2020-06-01"),
            ("", None, "2024-11-01"),
            ("AzureStackCloud", Some("2019-12-01"), "2019-12-01"),
            ("AzurePublicCloud", Some("2020-06-01"), "2020-06-01"),
        ];
        for (cloud, flag, want) in cases {
            assert_eq!(compute_api_version(cloud, flag), want, "{cloud} {flag:?}");
        }
    }

    #[test]
    fn the_whole_user_agent_goes_first() {
        let sdk = "azsdk-rust-mic/0.1.0 (1.90; linux; x86_64)";
        let cases = [
            (
                "aad-pod-identity/MIC/0.1.0",
                Some(sdk),
                "aad-pod-identity/MIC/0.1.0 azsdk-rust-mic/0.1.0 (1.90; linux; x86_64)",
            ),
            (
                "aad-pod-identity/MIC/0.1.0 my custom/agent",
                Some(sdk),
                "aad-pod-identity/MIC/0.1.0 my custom/agent azsdk-rust-mic/0.1.0 (1.90; linux; x86_64)",
            ),
            (
                "aad-pod-identity/MIC/0.1.0",
                None,
                "aad-pod-identity/MIC/0.1.0",
            ),
            ("a/MIC/1 bad\nline", Some(""), "a/MIC/1 bad line"),
        ];
        for (prefix, sdk, want) in cases {
            assert_eq!(full_user_agent(prefix, sdk), want);
        }
    }

    /// The header as it leaves the pipeline, read by a listener on loopback.
    #[tokio::test]
    async fn the_pipeline_sends_the_whole_user_agent() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 8192];
            let mut got = String::new();
            while !got.contains("\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            got
        });
        let options = ClientOptions {
            retry: RetryOptions::none(),
            ..Default::default()
        };
        let pipeline = Pipeline::new(
            Some("mic"),
            Some("9.9.9"),
            options,
            vec![],
            vec![Arc::new(FullUserAgent {
                prefix: "aad-pod-identity/MIC/9.9.9 custom".into(),
            })],
            None,
        );
        let url = Url::parse(&format!("http://{addr}/x")).unwrap();
        let mut req = Request::new(url, Method::Get);
        let send = PipelineSendOptions {
            skip_checks: true,
            ..Default::default()
        };
        pipeline
            .send(&Context::new(), &mut req, Some(send))
            .await
            .unwrap();
        let request = server.await.unwrap().to_lowercase();
        let ua = request
            .lines()
            .find_map(|l| l.strip_prefix("user-agent: "))
            .unwrap_or_default()
            .to_string();
        assert!(
            ua.starts_with("aad-pod-identity/mic/9.9.9 custom azsdk-rust-mic/9.9.9 "),
            "{ua}"
        );
    }

    #[test]
    fn client_and_principal_ids_are_kept_per_identity() {
        let body = serde_json::json!({
            "/subscriptions/S/resourceGroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/A":
                {"principalId": "P-1", "clientId": "C-1"},
            "/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/b":
                {},
            "/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/c":
                {"clientId": 7, "principalId": "p-3"},
        });
        let got = reported_identities(body.as_object().unwrap());
        let id = |n: &str| {
            format!(
                "/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/{n}"
            )
        };
        assert_eq!(
            got.get(&id("a")),
            Some(&ArmIdentity {
                client_id: "c-1".into(),
                principal_id: "p-1".into()
            })
        );
        assert_eq!(got.get(&id("b")), None, "nothing reported");
        assert_eq!(got.get(&id("c")).map(|a| a.client_id.as_str()), Some(""));
        let r = ResourceIdentity {
            user_assigned: [id("a"), id("c")].into(),
            reported: got,
            ..Default::default()
        };
        assert_eq!(r.client_id(&id("A")), Some("c-1"));
        assert_eq!(
            r.client_id(&id("c")),
            None,
            "a non-string client ID is none"
        );
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now: k8s_openapi::jiff::Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(parse_retry_after("17", now), Some(Duration::from_secs(17)));
        assert_eq!(
            parse_retry_after("Wed, 01 Jan 2025 00:01:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Tue, 31 Dec 2024 00:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
