//! Test namespaces: a pod namespace reaches a server the node namespace runs on
//! 169.254.169.254, and the root namespace is left untouched.

use std::process::Stdio;
use std::time::Duration;

use aadpodid_tests::netns::{IMDS_ADDRESS, NetNs, Node};

const FETCH: &str = "import sys,urllib.request;print(urllib.request.urlopen(sys.argv[1],timeout=5).read().decode())";

fn root_namespace_view() -> anyhow::Result<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "addr"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn pod_reaches_imds_address_served_inside_the_node() -> anyhow::Result<()> {
    let before = root_namespace_view()?;
    let node = Node::with_pods(2)?;
    node.node.add_local_address(IMDS_ADDRESS)?;
    let dir = tempdir()?;
    std::fs::write(dir.join("hello"), "from-node")?;

    let mut server = node
        .node
        .command("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            &IMDS_ADDRESS.to_string(),
            "80",
        ])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;

    let url = format!("http://{IMDS_ADDRESS}/hello");
    let mut answer = Err(anyhow::anyhow!("no attempt"));
    // Bounded: the server needs a moment to bind.
    for _ in 0..50 {
        answer = node.pods[1].0.run("python3", &["-c", FETCH, &url]);
        if answer.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(answer?.trim(), "from-node");

    let after = root_namespace_view()?;
    assert!(
        !after.contains("169.254.169.254"),
        "IMDS address leaked into the root namespace"
    );
    assert_eq!(before, after, "root namespace addresses changed");
    Ok(())
}

#[test]
fn namespaces_are_removed_on_drop() -> anyhow::Result<()> {
    let name = {
        let ns = NetNs::new("drop")?;
        ns.name().to_string()
    };
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    assert!(!String::from_utf8_lossy(&list.stdout).contains(&name));
    Ok(())
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(aadpodid_tests::unique_name("netns-test"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
