//! The Kubernetes client both binaries use.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// Why a client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The kubeconfig file could not be read or parsed.
    #[error("reading kubeconfig {path}: {source}")]
    ReadKubeconfig {
        /// The file.
        path: String,
        /// What went wrong.
        source: kube::config::KubeconfigError,
    },
    /// Neither in-cluster configuration nor a default kubeconfig was usable.
    #[error("inferring the Kubernetes configuration: {0}")]
    Infer(#[from] kube::config::InferConfigError),
    /// The configuration was read but a client could not be built from it.
    #[error("building the Kubernetes client: {0}")]
    Build(#[from] kube::Error),
}

/// A client from `kubeconfig` when given (upstream's `--kubeconfig`), else the
/// in-cluster service account or `$KUBECONFIG`. `user_agent` names the binary.
pub async fn kube_client(
    kubeconfig: Option<&Path>,
    user_agent: &str,
) -> Result<Client, ClientError> {
    let mut config = match kubeconfig {
        Some(path) => {
            let read_err = |source| ClientError::ReadKubeconfig {
                path: path.display().to_string(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(read_err)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(read_err)?
        }
        None => Config::infer().await?,
    };
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_str(user_agent)
            .unwrap_or_else(|_| http::HeaderValue::from_static("aad-pod-identity")),
    ));
    Ok(Client::try_from(config)?)
}
