//! With `--keep`: everything stays up after the token step until a signal,
//! with commands to try meanwhile.

use std::path::Path;

use aadpodid_testkit::Cluster;

use crate::registry::{Reg, keeping};
use crate::steps::pods::DemoPod;

/// Prints what to try, then waits for ever (the signal ends the demo).
pub async fn until_signal(
    registry: &Reg,
    cluster: &Cluster,
    pods: &[DemoPod],
    dir: &Path,
) -> anyhow::Result<()> {
    keeping(registry);
    println!("\n--keep: everything stays up until Ctrl-C. Try:");
    println!(
        "  {} --kubeconfig {} get azureidentities,azureidentitybindings,azureassignedidentities,pods,nodes -A",
        cluster.bin_dir().join("kubectl").display(),
        cluster.kubeconfig().display()
    );
    for p in pods {
        println!(
            "  ip netns exec {} curl -s -H Metadata:true 'http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/'",
            p.netns
        );
    }
    println!("  logs of mic and nmi: {}", dir.display());
    std::future::pending::<()>().await;
    Ok(())
}
