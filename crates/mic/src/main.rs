#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mic::cli_main().await
}
