#[tokio::main]
async fn main() -> anyhow::Result<()> {
    nmi::cli_main().await
}
