//! Bounds on what callers can make NMI hold: connections in all and per
//! source address ([`Connections`]), request bodies ([`declares_body`]), and
//! a gate that keeps refusals from flooding the log ([`LogGate`]). Pure; the
//! server acts on the answers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use http::{HeaderMap, header};
use tokio::time::Instant;

/// Whether a request declares a body: any `Transfer-Encoding`, or a
/// `Content-Length` that is not exactly 0 (an unreadable one counts).
pub fn declares_body(headers: &HeaderMap) -> bool {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return true;
    }
    headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .any(|v| v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) != Some(0))
}

/// Why a connection was refused (the `reason` label of
/// `aadpodidentity_nmi_connections_refused_count`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnRefusal {
    /// `--max-connections` connections are open.
    Total,
    /// `--max-connections-per-ip` connections from this address are open.
    PerIp,
}

impl ConnRefusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            ConnRefusal::Total => "max_connections",
            ConnRefusal::PerIp => "max_connections_per_ip",
        }
    }
}

/// Open connections, in all and per source address (IPv4-mapped IPv6
/// addresses count as their IPv4 address).
#[derive(Debug, Default)]
pub struct Connections {
    max_total: u32,
    max_per_ip: u32,
    total: u32,
    per_ip: HashMap<IpAddr, u32>,
}

impl Connections {
    /// At most `max_total` open connections and `max_per_ip` from one
    /// address (0 means none at all).
    pub fn new(max_total: u32, max_per_ip: u32) -> Self {
        Connections {
            max_total,
            max_per_ip,
            ..Default::default()
        }
    }

    /// Counts a new connection from `ip`, or says why it must be closed.
    pub fn admit(&mut self, ip: IpAddr) -> Result<(), ConnRefusal> {
        let ip = ip.to_canonical();
        if self.total >= self.max_total {
            return Err(ConnRefusal::Total);
        }
        let from_ip = self.per_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= self.max_per_ip {
            return Err(ConnRefusal::PerIp);
        }
        self.total += 1;
        self.per_ip.insert(ip, from_ip + 1);
        Ok(())
    }

    /// A connection admitted from `ip` has ended.
    pub fn release(&mut self, ip: IpAddr) {
        let ip = ip.to_canonical();
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
            self.total = self.total.saturating_sub(1);
        }
    }

    /// Open connections.
    pub fn open(&self) -> u32 {
        self.total
    }

    /// Addresses with open connections (the map's size).
    pub fn addresses(&self) -> usize {
        self.per_ip.len()
    }
}

/// Lets one log line through per `every`, counting what it held back.
#[derive(Debug)]
pub struct LogGate {
    every: Duration,
    last: Option<Instant>,
    held: u64,
}

impl LogGate {
    /// One line per `every`.
    pub fn new(every: Duration) -> Self {
        LogGate {
            every,
            last: None,
            held: 0,
        }
    }

    /// `Some(lines held back since the last one)` when a line may be logged
    /// at `now`.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now < last + self.every => {
                self.held += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::index::testutil::ip;

    #[test]
    fn connection_caps_table() {
        enum Op {
            Admit(&'static str, Result<(), ConnRefusal>),
            Release(&'static str),
        }
        use ConnRefusal::{PerIp, Total};
        use Op::*;
        let ok = |a| Admit(a, Ok(()));
        let no = |a, why| Admit(a, Err(why));
        const A: &str = "10.0.0.1";
        const B: &str = "10.0.0.2";
        const C: &str = "10.0.0.3";
        const A_MAPPED: &str = "::ffff:10.0.0.1";
        struct Case {
            name: &'static str,
            max_total: u32,
            max_per_ip: u32,
            ops: Vec<Op>,
            open: u32,
        }
        let cases = [
            Case {
                name: "per-address cap",
                max_total: 10,
                max_per_ip: 2,
                ops: vec![ok(A), ok(A), no(A, PerIp), ok(B)],
                open: 3,
            },
            Case {
                name: "global cap before the per-address one",
                max_total: 2,
                max_per_ip: 2,
                ops: vec![ok(A), ok(B), no(C, Total), no(A, Total)],
                open: 2,
            },
            Case {
                name: "a release makes room again",
                max_total: 10,
                max_per_ip: 1,
                ops: vec![ok(A), no(A, PerIp), Release(A), ok(A)],
                open: 1,
            },
            Case {
                name: "an IPv4-mapped address is its IPv4 address",
                max_total: 10,
                max_per_ip: 1,
                ops: vec![ok(A), no(A_MAPPED, PerIp), Release(A_MAPPED), ok(A)],
                open: 1,
            },
            Case {
                name: "releasing an unknown address changes nothing",
                max_total: 1,
                max_per_ip: 1,
                ops: vec![ok(A), Release("10.0.0.9"), no(B, Total)],
                open: 1,
            },
            Case {
                name: "zero caps refuse everything",
                max_total: 0,
                max_per_ip: 0,
                ops: vec![no(A, Total)],
                open: 0,
            },
        ];
        for case in cases {
            let mut c = Connections::new(case.max_total, case.max_per_ip);
            for (i, op) in case.ops.iter().enumerate() {
                match op {
                    Admit(a, want) => assert_eq!(c.admit(ip(a)), *want, "{} op {i}", case.name),
                    Release(a) => c.release(ip(a)),
                }
            }
            assert_eq!(c.open(), case.open, "{}", case.name);
        }
    }

    #[test]
    fn released_addresses_leave_the_map() {
        let mut c = Connections::new(100, 100);
        for i in 0..50u8 {
            c.admit(IpAddr::from([10, 0, 0, i])).unwrap();
        }
        assert_eq!(c.addresses(), 50);
        for i in 0..50u8 {
            c.release(IpAddr::from([10, 0, 0, i]));
        }
        assert_eq!((c.open(), c.addresses()), (0, 0));
        assert_eq!(ConnRefusal::PerIp.label(), "max_connections_per_ip");
        assert_eq!(ConnRefusal::Total.label(), "max_connections");
    }

    #[test]
    fn declared_bodies_table() {
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[], false),
            (&[("content-length", "0")], false),
            (&[("content-length", " 0 ")], false),
            (&[("content-length", "1")], true),
            (&[("content-length", "65536")], true),
            (&[("content-length", "x")], true),
            (&[("content-length", "0"), ("content-length", "5")], true),
            (&[("transfer-encoding", "chunked")], true),
            (&[("transfer-encoding", "identity")], true),
            (
                &[("transfer-encoding", "chunked"), ("content-length", "0")],
                true,
            ),
            (&[("metadata", "true")], false),
        ];
        for (headers, want) in cases {
            let mut map = HeaderMap::new();
            for (k, v) in *headers {
                map.append(
                    http::HeaderName::from_static(k),
                    http::HeaderValue::from_str(v).unwrap(),
                );
            }
            assert_eq!(declares_body(&map), *want, "{headers:?}");
        }
    }

    #[test]
    fn log_gate_lets_one_line_per_period() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut g = LogGate::new(s(10));
        assert_eq!(g.allow(t0), Some(0));
        assert_eq!(g.allow(t0 + s(1)), None);
        assert_eq!(g.allow(t0 + s(9)), None);
        assert_eq!(g.allow(t0 + s(10)), Some(2));
        assert_eq!(g.allow(t0 + s(11)), None);
        assert_eq!(g.allow(t0 + s(30)), Some(1));
    }
}
