//! The emulated Azure cloud as a real node and its pods see it: in each
//! node's network namespace, 169.254.169.254 is the emulator's IMDS for the
//! machine the node is (every connection's peer logged), and [`CLOUD_IP`]
//! serves the emulator's ARM and Entra ID endpoints over TLS with a
//! certificate of that address ([`CloudCa`]), so a pod on the node (MIC)
//! reaches them at `https://10.253.0.1:<port>` trusting one CA file.
//!
//! Nothing is added to the root namespace: the addresses are on the node
//! namespace's loopback, and the relays carry connections over Unix sockets
//! to the emulator on the test process's loopback.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use anyhow::Context as _;
use azure_emulator::Emulator;

use crate::cluster::issue_certs;
use crate::netns::IMDS_ADDRESS;
use crate::realnode::RealNode;
use crate::relay::{read_until_ready, unix_to_tcp};
use crate::tenant::CloudEnvironment;

/// Where ARM and Entra ID are inside every node (on the node's loopback; a
/// pod reaches it through its default route to the node).
pub const CLOUD_IP: Ipv4Addr = Ipv4Addr::new(10, 253, 0, 1);
/// ARM's port at [`CLOUD_IP`].
pub const ARM_PORT: u16 = 443;
/// Entra ID's port at [`CLOUD_IP`].
pub const AAD_PORT: u16 = 8443;
/// Public Azure's ARM host name, which the certificate of [`CLOUD_IP`]
/// names too. Upstream's Go mic asks Entra ID for a token whose resource is
/// the environment's `resourceManagerEndpoint` and the emulator's ARM takes
/// only tokens of public ARM's audiences (or of its own loopback URL), so
/// upstream's mic addresses ARM by this name, resolved to [`CLOUD_IP`] by a
/// host alias of its pod.
pub const ARM_PUBLIC_HOST: &str = "management.azure.com";

/// A TLS front: for each `host:port=socket` argument it accepts TLS with
/// the certificate `argv[1]`/key `argv[2]`, and carries what it decrypts to
/// the Unix socket over a second TLS session to the emulator, verified with
/// the CA bundle `argv[3]` under the name `localhost` (the emulator's
/// certificate names loopback only). Prints READY once listening.
const TLS_FRONT: &str = r#"
import asyncio, ssl, sys
server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
server.load_cert_chain(sys.argv[1], sys.argv[2])
upstream = ssl.create_default_context(cafile=sys.argv[3])
async def pump(source, sink):
    # Until either side ends; then the sink is closed.
    try:
        while chunk := await source.read(1 << 16):
            sink.write(chunk)
            await sink.drain()
    except (OSError, ssl.SSLError):
        pass
    sink.close()
async def main():
    for spec in sys.argv[4:]:
        hostport, path = spec.split('=')
        host, port = hostport.rsplit(':', 1)
        async def handle(r, w, path=path):
            try:
                ur, uw = await asyncio.wait_for(asyncio.open_unix_connection(
                    path, ssl=upstream, server_hostname="localhost"), 10)
            except Exception:
                w.close()
                return
            await asyncio.gather(pump(r, uw), pump(ur, w))
        await asyncio.start_server(handle, host, int(port), ssl=server)
    print("READY", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"#;

/// A CA of the test's own and a server certificate for [`CLOUD_IP`] signed
/// by it (openssl), in a folder.
#[derive(Debug, Clone)]
pub struct CloudCa {
    /// The CA certificate: what a client of [`CLOUD_IP`] trusts.
    pub ca: PathBuf,
    /// The server certificate (SAN `IP:10.253.0.1` and
    /// [`ARM_PUBLIC_HOST`]).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

impl CloudCa {
    /// Makes them in `dir`.
    pub fn make(dir: &Path) -> anyhow::Result<CloudCa> {
        std::fs::create_dir_all(dir)?;
        issue_certs(
            dir,
            ("cloud-ca", "/CN=aadpodid-cloud-ca"),
            &[(
                "cloud",
                "/CN=cloud",
                &format!(
                    "subjectAltName=IP:{CLOUD_IP},DNS:{ARM_PUBLIC_HOST}\n\
                     extendedKeyUsage=serverAuth\n"
                ),
            )],
        )?;
        Ok(CloudCa {
            ca: dir.join("cloud-ca.crt"),
            cert: dir.join("cloud.crt"),
            key: dir.join("cloud.key"),
        })
    }

    /// The custom-cloud environment of the emulator as the nodes reach it.
    pub fn environment() -> CloudEnvironment {
        CloudEnvironment::at(
            &format!("https://{CLOUD_IP}:{ARM_PORT}"),
            &format!("https://{CLOUD_IP}:{AAD_PORT}/"),
        )
    }
}

/// The cloud inside one node: its IMDS relay and its TLS front, stopped on
/// drop.
#[derive(Debug)]
pub struct NodeCloud {
    imds_peers: PathBuf,
    children: Vec<Child>,
}

impl NodeCloud {
    /// Puts IMDS for `machine` (the emulator's name: `vmss/<set>/<i>`) at
    /// 169.254.169.254:80 and ARM/Entra ID at [`CLOUD_IP`] into `node`,
    /// with the certificate of `ca`; sockets and the peer log go into `dir`.
    pub async fn start(
        node: &RealNode,
        emu: &Emulator,
        machine: &str,
        ca: &CloudCa,
        dir: &Path,
    ) -> anyhow::Result<NodeCloud> {
        let ns = node.netns();
        std::fs::create_dir_all(dir)?;
        ns.add_local_address(IMDS_ADDRESS)?;
        ns.add_local_address(CLOUD_IP)?;
        let imds = emu.add_imds(machine, "127.0.0.1:0".parse()?).await?;
        let imds_peers = dir.join("imds-peers.log");
        let mut cloud = NodeCloud {
            imds_peers: imds_peers.clone(),
            children: Vec::new(),
        };
        let imds_dir = dir.join("imds");
        std::fs::create_dir_all(&imds_dir)?;
        cloud.children.push(
            ns.relay_logged(
                &[(SocketAddr::from((IMDS_ADDRESS, 80)), imds, Some(imds_peers))],
                &imds_dir,
            )
            .await?,
        );
        let mut front = ns.command("python3");
        front
            .arg("-c")
            .arg(TLS_FRONT)
            .arg(&ca.cert)
            .arg(&ca.key)
            .arg(emu.ca_bundle_path());
        for (port, url, name) in [
            (ARM_PORT, emu.arm_url(), "arm"),
            (AAD_PORT, emu.aad_url(), "aad"),
        ] {
            let sock = dir.join(format!("{name}.sock"));
            unix_to_tcp(sock.clone(), address_of(&url)?).await?;
            front.arg(format!("{CLOUD_IP}:{port}={}", sock.display()));
        }
        let mut child = front
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start the TLS front")?;
        if let Err(e) = read_until_ready(&mut child, "TLS front") {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        cloud.children.push(child);
        Ok(cloud)
    }

    /// The IMDS relay's log: one line per connection, with its peer (see
    /// [`crate::relay::peer_log`]).
    pub fn imds_peers(&self) -> &Path {
        &self.imds_peers
    }
}

impl Drop for NodeCloud {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The address of an `https://<ip>:<port>[/]` URL.
fn address_of(url: &str) -> anyhow::Result<SocketAddr> {
    url.trim_start_matches("https://")
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("address of {url}"))
}
