use clap::Parser;

use aadpodid_runtime::Shutdown;
use aadpodid_runtime::logging::{self, LogFormat};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = mic::args::Args::parse();
    let format: LogFormat = args.log_format.parse().map_err(anyhow::Error::msg)?;
    logging::init(format, if args.verbosity > 0 { "debug" } else { "info" });
    let env = |k: &str| std::env::var(k).ok();
    // Upstream checks MIC_POD_NAMESPACE before --version (§2.1).
    if env(mic::args::ENV_MIC_POD_NAMESPACE).is_none_or(|v| v.is_empty()) {
        anyhow::bail!("{} must be set", mic::args::ENV_MIC_POD_NAMESPACE);
    }
    if args.version {
        println!("{}", mic::VERSION);
        return Ok(());
    }
    if args.enable_scale_features {
        tracing::info!("--enableScaleFeatures is deprecated and has no effect");
    }
    let settings = mic::Settings::from_args(&args, &env)?;
    tracing::info!(version = mic::VERSION, lease = %settings.leader.name, identity = %settings.leader.identity, "starting MIC");
    let shutdown = Shutdown::on_signals()?;
    mic::run(settings, shutdown, None).await?;
    Ok(())
}
