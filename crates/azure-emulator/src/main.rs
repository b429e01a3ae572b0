//! `azure-emulator --config FILE`: serves ARM, AAD and admin on loopback, writes
//! the CA bundle, opens the configured IMDS listeners, prints where everything
//! is, and runs until interrupted.

use anyhow::{Context, bail};
use azure_emulator::{Config, Emulator};

const USAGE: &str = "usage: azure-emulator --config FILE\n\nFILE is YAML or JSON; see the crate docs for the fields.";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut config = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" => config = args.next(),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument '{other}'\n{USAGE}"),
        }
    }
    let Some(path) = config else {
        bail!("--config is required\n{USAGE}")
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let cfg = Config::from_yaml(&text).with_context(|| format!("parsing {path}"))?;
    let emu = Emulator::start(cfg)
        .await
        .context("starting the emulator")?;
    println!("ARM_URL={}", emu.arm_url());
    println!("AAD_URL={}", emu.aad_url());
    println!("ADMIN_URL={}", emu.admin_url());
    println!("CA_BUNDLE={}", emu.ca_bundle_path().display());
    for l in emu.imds_listeners() {
        println!("IMDS {}=http://{}", l.machine, l.address);
    }
    println!("READY");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    emu.shutdown();
    Ok(())
}
