//! One relay between network namespaces, over Unix sockets (which are not
//! network-namespaced, so nothing is added to any namespace's routing):
//!
//! - inside a namespace, a small Python process listens on TCP addresses and
//!   carries each connection to a Unix socket ([`NetNs::relay_to`],
//!   [`NetNs::relay_many`]);
//! - in the calling process, [`unix_to_tcp`] carries each connection on that
//!   Unix socket to a loopback address of the calling process's namespace;
//! - [`tcp_to_unix`] is the same inside-namespace half in Rust, for a
//!   process that runs in the namespace itself;
//! - [`gated_forward`] is a loopback port whose connections to a target a
//!   test can hold shut (a node's way to the apiserver, cut and restored).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use anyhow::{Context as _, bail};

use crate::netns::NetNs;

/// A Python relay run inside a namespace: each `host:port=path` spec
/// listens on `host:port` there and carries every connection to the Unix
/// socket at `path`; a spec `host:port=path=log` also appends one line per
/// accepted connection to the file `log`: `<ms since the epoch> <peer address>`.
const UNIX_RELAY: &str = r#"
import asyncio, sys, time
async def pipe(r, w):
    try:
        while True:
            d = await r.read(65536)
            if not d:
                break
            w.write(d)
            await w.drain()
    except Exception:
        pass
    finally:
        try:
            w.close()
        except Exception:
            pass
async def main():
    servers = []
    for spec in sys.argv[1:]:
        parts = spec.split('=')
        hostport, path = parts[0], parts[1]
        log = open(parts[2], 'a', buffering=1) if len(parts) > 2 else None
        host, port = hostport.rsplit(':', 1)
        async def handle(r, w, path=path, log=log):
            if log is not None:
                peer = w.get_extra_info('peername')
                log.write("%d %s\n" % (time.time() * 1000, peer[0] if peer else "?"))
            try:
                ur, uw = await asyncio.open_unix_connection(path)
            except Exception:
                w.close()
                return
            await asyncio.gather(pipe(r, uw), pipe(ur, w))
        servers.append(await asyncio.start_server(handle, host, int(port)))
    print("READY", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"#;

impl NetNs {
    /// Makes `listen` (an address inside this namespace) reach `target` (a
    /// loopback address of the calling process's namespace) through a Unix
    /// socket under `dir`: Unix sockets are not network-namespaced, so
    /// nothing is added to either namespace's routing. Returns the relay
    /// process, listening when this returns; it dies with the calling thread.
    pub async fn relay_to(
        &self,
        listen: SocketAddr,
        target: SocketAddr,
        dir: &Path,
    ) -> anyhow::Result<Child> {
        let sock = dir.join(format!("relay-{}.sock", listen.port()));
        unix_to_tcp(sock.clone(), target).await?;
        let relay = self
            .command("python3")
            .arg("-c")
            .arg(UNIX_RELAY)
            .arg(format!("{listen}={}", sock.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start the relay")?;
        ready_or_kill(relay)
    }
}

impl NetNs {
    /// [`NetNs::relay_to`] for several addresses with one relay process:
    /// each `(listen, target)` pair makes `listen` inside this namespace
    /// reach `target` on the calling process's loopback, through a Unix
    /// socket under `dir` (one folder per namespace, so socket names of
    /// different namespaces never meet).
    pub async fn relay_many(
        &self,
        pairs: &[(SocketAddr, SocketAddr)],
        dir: &Path,
    ) -> anyhow::Result<Child> {
        let logged: Vec<_> = pairs.iter().map(|(l, t)| (*l, *t, None)).collect();
        self.relay_logged(&logged, dir).await
    }

    /// [`NetNs::relay_many`] where a pair may name a file that gets one
    /// line per connection accepted on its `listen` address:
    /// `<ms since the epoch> <peer address>` (who called, as seen inside
    /// this namespace; [`peer_log`] reads it).
    pub async fn relay_logged(
        &self,
        pairs: &[(SocketAddr, SocketAddr, Option<PathBuf>)],
        dir: &Path,
    ) -> anyhow::Result<Child> {
        let mut cmd = self.command("python3");
        cmd.arg("-c").arg(UNIX_RELAY);
        for (i, (listen, target, log)) in pairs.iter().enumerate() {
            let sock = dir.join(format!("relay-{i}.sock"));
            unix_to_tcp(sock.clone(), *target).await?;
            let log = log.as_ref().map(|l| format!("={}", l.display()));
            cmd.arg(format!(
                "{listen}={}{}",
                sock.display(),
                log.unwrap_or_default()
            ));
        }
        let relay = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start the relay")?;
        ready_or_kill(relay)
    }
}

/// The connections a relay's log (see [`NetNs::relay_logged`]) holds:
/// (ms since the epoch, peer address), unreadable lines left out; empty when
/// there is no file yet.
pub fn peer_log(path: &Path) -> Vec<(u64, std::net::IpAddr)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (at, peer) = l.split_once(' ')?;
            Some((at.trim().parse().ok()?, peer.trim().parse().ok()?))
        })
        .collect()
}

/// Waits for the relay's `READY`; kills it when it does not come.
fn ready_or_kill(mut relay: Child) -> anyhow::Result<Child> {
    if let Err(e) = read_until_ready(&mut relay, "relay") {
        let _ = relay.kill();
        let _ = relay.wait();
        return Err(e);
    }
    Ok(relay)
}

/// Forwards every connection on a Unix socket at `path` (replaced if it
/// exists) to `target`, from tasks of the calling runtime.
pub async fn unix_to_tcp(path: PathBuf, target: SocketAddr) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("bind {}", path.display()))?;
    tokio::spawn(async move {
        while let Ok((mut unix, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut tcp) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut unix, &mut tcp).await;
                }
            });
        }
    });
    Ok(())
}

/// Listens on a loopback port and forwards each connection to `target`
/// once `gate` is open (a connection accepted while it is shut waits);
/// returns the port's address.
pub async fn gated_forward(
    target: SocketAddr,
    gate: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let mut gate = gate.clone();
            tokio::spawn(async move {
                if gate.wait_for(|open| *open).await.is_err() {
                    return;
                }
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Ok(addr)
}

/// Reads `child`'s stdout lines until one ends with `READY` (libtest may
/// print `test NAME ... ` before it on the same line); returns the lines
/// before it. Bounded: at most 50 lines, or until the child exits.
pub fn read_until_ready(child: &mut Child, what: &str) -> anyhow::Result<Vec<String>> {
    use std::io::BufRead;
    let out = child.stdout.take().context("stdout not piped")?;
    let mut lines = Vec::new();
    for line in std::io::BufReader::new(out).lines().take(50) {
        let line = line?;
        if line.trim().ends_with("READY") {
            return Ok(lines);
        }
        lines.push(line);
    }
    bail!("{what} did not start: {lines:?}")
}

/// Listens on `listen` (in the calling process's namespace) and carries every
/// connection to the Unix socket at `path`, from tasks of the calling runtime.
pub async fn tcp_to_unix(listen: SocketAddr, path: PathBuf) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let path = path.clone();
            tokio::spawn(async move {
                if let Ok(mut unix) = tokio::net::UnixStream::connect(&path).await {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                }
            });
        }
    });
    Ok(())
}
