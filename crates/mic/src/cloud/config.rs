//! azure.json (`--cloudconfig`) and environment parsing, as upstream's
//! `pkg/config/azureconfig.go` and `pkg/cloudprovider/cloudprovider.go Init`
//! (docs/upstream-behaviour.md#mic-and-arm). Pure: the caller
//! passes file contents and an environment lookup.

use aadpodid_runtime::azure_json::{AzureJson, AzureJsonError, KUBELET_CLIENT_ID_KEY};
use azure_core::credentials::Secret;
use serde::Deserialize;

/// Upstream points go-autorest at a custom cloud's endpoints through this file.
pub const ENV_AZURE_ENVIRONMENT_FILEPATH: &str = "AZURE_ENVIRONMENT_FILEPATH";

/// Everything MIC needs from azure.json or the environment.
#[derive(Clone, Debug)]
pub struct CloudConfig {
    pub cloud: String,
    pub tenant_id: String,
    pub subscription_id: String,
    /// Every ARM call uses this group, never the one in a node's providerID.
    pub resource_group: String,
    pub credential: CredentialConfig,
    /// Client ID of the cluster (kubelet) identity; never removed from a node.
    pub user_assigned_identity_id: String,
    pub endpoints: Endpoints,
}

/// How MIC authenticates to ARM (upstream's choice: managed identity when
/// `useManagedIdentityExtension`, else the service principal).
#[derive(Clone, Debug)]
pub enum CredentialConfig {
    ServicePrincipal { client_id: String, secret: Secret },
    SystemAssignedMsi,
    UserAssignedMsi { client_id: String },
}

/// The ARM and AAD endpoints of a cloud.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// Base URL of ARM, with a trailing slash.
    pub resource_manager: String,
    /// AAD authority host, with a trailing slash.
    pub active_directory: String,
    /// Audience of ARM tokens; the scope asked for is `<audience>/.default`.
    pub token_audience: String,
}

impl Endpoints {
    fn new(arm: &str, aad: &str) -> Self {
        Endpoints {
            resource_manager: arm.into(),
            active_directory: aad.into(),
            token_audience: arm.into(),
        }
    }

    /// The OAuth scope for ARM tokens.
    pub fn arm_scope(&self) -> String {
        format!("{}/.default", self.token_audience.trim_end_matches('/'))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CloudConfigError {
    #[error("parsing cloud config {path}: {message}")]
    ParseCloudConfig { path: String, message: String },
    #[error(
        "unknown cloud {name:?}: use AzurePublicCloud, AzureChinaCloud, AzureUSGovernmentCloud, AzureGermanCloud or AzureStackCloud"
    )]
    UnknownCloud { name: String },
    #[error("cloud AzureStackCloud needs {ENV_AZURE_ENVIRONMENT_FILEPATH}")]
    MissingEnvironmentFile,
    #[error("reading the custom cloud environment {path}: {message}")]
    ReadEnvironmentFile { path: String, message: String },
    #[error("{field} is empty")]
    MissingField { field: &'static str },
}

/// The go-autorest environment file (`AZURE_ENVIRONMENT_FILEPATH`); only the
/// fields MIC uses. `tokenAudience` is go-autorest's own field; when absent
/// the audience is the ARM endpoint, as upstream.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnvironmentFile {
    resource_manager_endpoint: String,
    active_directory_endpoint: String,
    #[serde(default)]
    token_audience: String,
}

fn with_slash(s: &str) -> String {
    if s.ends_with('/') {
        s.to_string()
    } else {
        format!("{s}/")
    }
}

/// Endpoints of a go-autorest environment name; `read_file` reads the
/// custom-cloud file for `AzureStackCloud`.
pub fn endpoints_for(
    cloud: &str,
    environment_file: Option<&str>,
    read_file: &dyn Fn(&str) -> Result<String, String>,
) -> Result<Endpoints, CloudConfigError> {
    // go-autorest's EnvironmentFromName upper-cases the name before the lookup.
    match cloud.to_uppercase().as_str() {
        "AZUREPUBLICCLOUD" | "AZURECLOUD" => Ok(Endpoints::new(
            "https://management.azure.com/",
            "https://login.microsoftonline.com/",
        )),
        "AZURECHINACLOUD" => Ok(Endpoints::new(
            "https://management.chinacloudapi.cn/",
            "https://login.chinacloudapi.cn/",
        )),
        "AZUREUSGOVERNMENTCLOUD" => Ok(Endpoints::new(
            "https://management.usgovcloudapi.net/",
            "https://login.microsoftonline.us/",
        )),
        "AZUREGERMANCLOUD" => Ok(Endpoints::new(
            "https://management.microsoftazure.de/",
            "https://login.microsoftonline.de/",
        )),
        "AZURESTACKCLOUD" => {
            let path = environment_file
                .filter(|p| !p.is_empty())
                .ok_or(CloudConfigError::MissingEnvironmentFile)?;
            let read_err = |message: String| CloudConfigError::ReadEnvironmentFile {
                path: path.into(),
                message,
            };
            let text = read_file(path).map_err(read_err)?;
            let env: EnvironmentFile =
                serde_json::from_str(&text).map_err(|e| read_err(e.to_string()))?;
            let arm = with_slash(&env.resource_manager_endpoint);
            Ok(Endpoints {
                token_audience: if env.token_audience.is_empty() {
                    arm.clone()
                } else {
                    env.token_audience
                },
                resource_manager: arm,
                active_directory: with_slash(&env.active_directory_endpoint),
            })
        }
        _ => Err(CloudConfigError::UnknownCloud { name: cloud.into() }),
    }
}

/// Raw settings before the credential is chosen.
#[derive(Clone, Debug, Default, PartialEq)]
struct Raw {
    cloud: String,
    tenant_id: String,
    client_id: String,
    client_secret: String,
    subscription_id: String,
    resource_group: String,
    use_msi: bool,
    user_assigned_identity_id: String,
}

fn raw_from_file(path: &str, text: &str) -> Result<Raw, CloudConfigError> {
    // Upstream reads the file with sigs.k8s.io/yaml, i.e. YAML converted to
    // JSON and decoded by encoding/json, which matches keys case-insensitively;
    // nmi reads the kubelet identity from the same file with the same reader.
    let parse_err = |e: AzureJsonError| CloudConfigError::ParseCloudConfig {
        path: path.into(),
        message: e.to_string(),
    };
    let file = AzureJson::parse(text).map_err(parse_err)?;
    let s = |key: &str| file.string(key).map_err(parse_err);
    Ok(Raw {
        cloud: s("cloud")?,
        tenant_id: s("tenantId")?,
        client_id: s("aadClientId")?,
        client_secret: s("aadClientSecret")?,
        subscription_id: s("subscriptionId")?,
        resource_group: s("resourceGroup")?,
        use_msi: file
            .boolean("useManagedIdentityExtension")
            .map_err(parse_err)?,
        user_assigned_identity_id: s(KUBELET_CLIENT_ID_KEY)?,
    })
}

fn raw_from_env(env: &dyn Fn(&str) -> Option<String>) -> Raw {
    let get = |k: &str| env(k).unwrap_or_default();
    Raw {
        cloud: get("CLOUD"),
        tenant_id: get("TENANT_ID"),
        client_id: get("CLIENT_ID"),
        client_secret: get("CLIENT_SECRET"),
        subscription_id: get("SUBSCRIPTION_ID"),
        resource_group: get("RESOURCE_GROUP"),
        // strings.EqualFold(USE_MSI, "True") upstream.
        use_msi: get("USE_MSI").eq_ignore_ascii_case("true"),
        user_assigned_identity_id: get("USER_ASSIGNED_MSI_CLIENT_ID"),
    }
}

/// Reads the cloud config: from `file` (path, contents) when `--cloudconfig`
/// is set, else from the environment. `env` is consulted for
/// `AZURE_ENVIRONMENT_FILEPATH` either way.
pub fn load(
    file: Option<(&str, &str)>,
    env: &dyn Fn(&str) -> Option<String>,
    read_file: &dyn Fn(&str) -> Result<String, String>,
) -> Result<CloudConfig, CloudConfigError> {
    let raw = match file {
        Some((path, text)) => raw_from_file(path, text)?,
        None => raw_from_env(env),
    };
    let endpoints = endpoints_for(
        &raw.cloud,
        env(ENV_AZURE_ENVIRONMENT_FILEPATH).as_deref(),
        read_file,
    )?;
    if raw.subscription_id.is_empty() {
        return Err(CloudConfigError::MissingField {
            field: "subscriptionId",
        });
    }
    if raw.resource_group.is_empty() {
        return Err(CloudConfigError::MissingField {
            field: "resourceGroup",
        });
    }
    let credential = match (raw.use_msi, raw.user_assigned_identity_id.is_empty()) {
        (true, true) => CredentialConfig::SystemAssignedMsi,
        (true, false) => CredentialConfig::UserAssignedMsi {
            client_id: raw.user_assigned_identity_id.clone(),
        },
        (false, _) => {
            if raw.tenant_id.is_empty() {
                return Err(CloudConfigError::MissingField { field: "tenantId" });
            }
            CredentialConfig::ServicePrincipal {
                client_id: raw.client_id.clone(),
                secret: Secret::new(raw.client_secret.clone()),
            }
        }
    };
    Ok(CloudConfig {
        cloud: raw.cloud,
        tenant_id: raw.tenant_id,
        subscription_id: raw.subscription_id,
        resource_group: raw.resource_group,
        credential,
        user_assigned_identity_id: raw.user_assigned_identity_id,
        endpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_file(_: &str) -> Result<String, String> {
        Err("no files here".into())
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    const AKS_AZURE_JSON: &str = r#"{
        "cloud": "AzurePublicCloud",
        "tenantId": "t-1",
        "subscriptionId": "s-1",
        "aadClientId": "msi",
        "aadClientSecret": "msi",
        "resourceGroup": "MC_rg_c_eastus",
        "location": "eastus",
        "vmType": "vmss",
        "useManagedIdentityExtension": true,
        "userAssignedIdentityID": "kubelet-client-id"
    }"#;

    #[test]
    fn aks_managed_identity_cluster() {
        let c = load(
            Some(("/etc/kubernetes/azure.json", AKS_AZURE_JSON)),
            &no_env,
            &no_file,
        )
        .unwrap();
        assert_eq!(c.subscription_id, "s-1");
        assert_eq!(c.resource_group, "MC_rg_c_eastus");
        assert_eq!(c.user_assigned_identity_id, "kubelet-client-id");
        assert!(matches!(
            c.credential,
            CredentialConfig::UserAssignedMsi { ref client_id } if client_id == "kubelet-client-id"
        ));
        assert_eq!(
            c.endpoints.resource_manager,
            "https://management.azure.com/"
        );
        assert_eq!(
            c.endpoints.arm_scope(),
            "https://management.azure.com/.default"
        );
    }

    #[test]
    fn service_principal_with_yaml_and_other_key_case() {
        let text = "cloud: AzureChinaCloud\ntenantID: t\naadClientID: app\naadClientSecret: pw\nsubscriptionId: s\nresourceGroup: rg\n";
        let c = load(Some(("f", text)), &no_env, &no_file).unwrap();
        match &c.credential {
            CredentialConfig::ServicePrincipal { client_id, secret } => {
                assert_eq!(client_id, "app");
                assert_eq!(secret.secret(), "pw");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            c.endpoints.active_directory,
            "https://login.chinacloudapi.cn/"
        );
        assert!(
            !format!("{c:?}").contains("pw"),
            "secret must not be printed"
        );
    }

    #[test]
    fn system_assigned_msi_from_env() {
        let env = |k: &str| {
            Some(
                match k {
                    "CLOUD" => "AzurePublicCloud",
                    "SUBSCRIPTION_ID" => "s",
                    "RESOURCE_GROUP" => "rg",
                    "USE_MSI" => "TRUE",
                    _ => return None,
                }
                .to_string(),
            )
        };
        let c = load(None, &env, &no_file).unwrap();
        assert!(matches!(c.credential, CredentialConfig::SystemAssignedMsi));
    }

    #[test]
    fn custom_cloud_from_environment_file() {
        let env = |k: &str| (k == ENV_AZURE_ENVIRONMENT_FILEPATH).then(|| "/e.json".to_string());
        let read =
            |p: &str| {
                assert_eq!(p, "/e.json");
                Ok(r#"{"name":"AzureStackCloud","resourceManagerEndpoint":"https://127.0.0.1:8443",
                  "activeDirectoryEndpoint":"https://127.0.0.1:9443/",
                  "tokenAudience":"https://management.azure.com/"}"#
                .to_string())
            };
        let text = r#"{"cloud":"AzureStackCloud","tenantId":"t","aadClientId":"a","aadClientSecret":"b","subscriptionId":"s","resourceGroup":"rg"}"#;
        let c = load(Some(("f", text)), &env, &read).unwrap();
        assert_eq!(c.endpoints.resource_manager, "https://127.0.0.1:8443/");
        assert_eq!(c.endpoints.active_directory, "https://127.0.0.1:9443/");
        assert_eq!(
            c.endpoints.arm_scope(),
            "https://management.azure.com/.default"
        );
    }

    #[test]
    fn bad_inputs_are_named() {
        let text = r#"{"cloud":"Mars","subscriptionId":"s","resourceGroup":"rg"}"#;
        assert!(matches!(
            load(Some(("f", text)), &no_env, &no_file),
            Err(CloudConfigError::UnknownCloud { .. })
        ));
        let text = r#"{"cloud":"AzureStackCloud","subscriptionId":"s","resourceGroup":"rg"}"#;
        assert!(matches!(
            load(Some(("f", text)), &no_env, &no_file),
            Err(CloudConfigError::MissingEnvironmentFile)
        ));
        let text = r#"{"cloud":"AzurePublicCloud","resourceGroup":"rg"}"#;
        assert!(matches!(
            load(Some(("f", text)), &no_env, &no_file),
            Err(CloudConfigError::MissingField {
                field: "subscriptionId"
            })
        ));
        assert!(matches!(
            load(Some(("f", "{not json")), &no_env, &no_file),
            Err(CloudConfigError::ParseCloudConfig { .. })
        ));
    }
}
