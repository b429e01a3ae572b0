//! Names, ports and Azure IDs shared by every test: unique names, free
//! loopback ports, and the tenant and subscription the emulated Azure uses.

use std::net::TcpListener;

/// The Entra tenant of every emulated Azure the tests build (the emulator's
/// own example tenant).
pub const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

/// The subscription of every emulated Azure the tests build, unless a test
/// says otherwise.
pub const SUB: &str = "0b1f6471-1bf0-4dda-aec3-cb9272f09590";

/// A name unique within this test process and across processes: `<prefix>-<pid>-<n>`.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A loopback TCP port that was free when asked (another process may take it
/// before the caller binds it; tests bind soon after).
pub fn free_port() -> anyhow::Result<u16> {
    let [port] = free_ports()?;
    Ok(port)
}

/// `N` different loopback TCP ports that were free when asked.
pub fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    // Hold all listeners until every port is chosen so they differ.
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = [0; N];
    for (p, l) in ports.iter_mut().zip(&listeners) {
        *p = l.local_addr()?.port();
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ() {
        assert_ne!(unique_name("t"), unique_name("t"));
    }

    #[test]
    fn free_ports_differ() -> anyhow::Result<()> {
        let [a, b, c] = free_ports()?;
        assert!(a != b && b != c && a != c, "{a} {b} {c}");
        assert_ne!(free_port()?, 0);
        Ok(())
    }
}
