use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = nmi::Args::parse();
    if args.version {
        println!("nmi {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    let format = args
        .log_format
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    aadpodid_runtime::logging::init(format, "info");
    let shutdown = aadpodid_runtime::Shutdown::on_signals()?;
    nmi::run(args, shutdown).await?;
    Ok(())
}
