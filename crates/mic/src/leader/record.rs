//! The leader-election record, as client-go keeps it in a Lease's spec and,
//! for upstream's Endpoints lock, as JSON in an annotation.

use k8s_openapi::api::coordination::v1::LeaseSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;

/// The annotation of the Endpoints lock that holds the record.
pub const ANNOTATION: &str = "control-plane.alpha.kubernetes.io/leader";

/// The holder given to a record that cannot be read (client-go's name for an
/// unknown leader): it is never free until it expires.
pub const UNKNOWN_HOLDER: &str = "leaderelection.k8s.io/unknown";

/// One lock's record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// Empty: nobody holds the lock (never taken, or released).
    pub holder: String,
    pub lease_duration_seconds: i32,
    pub acquire_time: Option<Timestamp>,
    pub renew_time: Option<Timestamp>,
    pub leader_transitions: i32,
}

/// The annotation's JSON as client-go reads it: every field may be missing
/// or null.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    holder_identity: Option<String>,
    lease_duration_seconds: Option<i32>,
    acquire_time: Option<String>,
    renew_time: Option<String>,
    leader_transitions: Option<i32>,
}

impl Record {
    /// The record of an Endpoints lock from its annotation: none is an empty
    /// record (a free lock), one that does not parse is held by
    /// [`UNKNOWN_HOLDER`].
    pub fn from_annotation(annotation: Option<&str>) -> Record {
        let Some(text) = annotation else {
            return Record::default();
        };
        Record::parse_annotation(text).unwrap_or_else(|| Record {
            holder: UNKNOWN_HOLDER.into(),
            ..Record::default()
        })
    }

    fn parse_annotation(text: &str) -> Option<Record> {
        let w: Wire = serde_json::from_str(text).ok()?;
        let time = |t: Option<String>| -> Option<Option<Timestamp>> {
            match t {
                None => Some(None),
                Some(s) => s.parse().ok().map(Some),
            }
        };
        Some(Record {
            holder: w.holder_identity.unwrap_or_default(),
            lease_duration_seconds: w.lease_duration_seconds.unwrap_or(0),
            acquire_time: time(w.acquire_time)?,
            renew_time: time(w.renew_time)?,
            leader_transitions: w.leader_transitions.unwrap_or(0),
        })
    }

    /// The annotation exactly as client-go writes it (Go's `encoding/json`
    /// of its record): fields in this order, times in whole UTC seconds or
    /// `null`, `<`, `>` and `&` escaped.
    pub fn to_annotation(&self) -> String {
        format!(
            "{{\"holderIdentity\":{},\"leaseDurationSeconds\":{},\"acquireTime\":{},\"renewTime\":{},\"leaderTransitions\":{}}}",
            go_string(&self.holder),
            self.lease_duration_seconds,
            go_time(self.acquire_time),
            go_time(self.renew_time),
            self.leader_transitions,
        )
    }

    /// The record of a Lease.
    pub fn from_lease(spec: Option<&LeaseSpec>) -> Record {
        let Some(s) = spec else {
            return Record::default();
        };
        Record {
            holder: s.holder_identity.clone().unwrap_or_default(),
            lease_duration_seconds: s.lease_duration_seconds.unwrap_or(0),
            acquire_time: s.acquire_time.as_ref().map(|t| t.0),
            renew_time: s.renew_time.as_ref().map(|t| t.0),
            leader_transitions: s.lease_transitions.unwrap_or(0),
        }
    }

    /// Writes the record into a Lease's spec, keeping its other fields.
    pub fn apply_to_lease(&self, spec: &mut LeaseSpec) {
        spec.holder_identity = (!self.holder.is_empty()).then(|| self.holder.clone());
        spec.lease_duration_seconds = Some(self.lease_duration_seconds);
        spec.acquire_time = self.acquire_time.map(MicroTime);
        spec.renew_time = self.renew_time.map(MicroTime);
        spec.lease_transitions = Some(self.leader_transitions);
    }
}

fn go_time(t: Option<Timestamp>) -> String {
    match t {
        None => "null".into(),
        Some(t) => format!("\"{}\"", t.strftime("%Y-%m-%dT%H:%M:%SZ")),
    }
}

fn go_string(s: &str) -> String {
    let json = serde_json::Value::String(s.to_string()).to_string();
    json.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn mk_record(holder: &str) -> Record {
        Record {
            holder: holder.into(),
            lease_duration_seconds: 15,
            acquire_time: Some(ts("2026-12-05T01:52:33.987654321Z")),
            renew_time: Some(ts("2026-12-05T01:52:40Z")),
            leader_transitions: 3,
        }
    }

    #[test]
    fn annotation_is_what_go_writes() {
        // Go 1.26's encoding/json of client-go v0.23.17's LeaderElectionRecord
        // with these values (sub-second times truncated, HTML escaped).
        assert_eq!(
            mk_record("mic-a<&>").to_annotation(),
            r#"{"holderIdentity":"mic-a\u003c\u0026\u003e","leaseDurationSeconds":15,"acquireTime":"2026-12-05T01:52:33Z","renewTime":"2026-12-05T01:52:40Z","leaderTransitions":3}"#
        );
        assert_eq!(
            Record::default().to_annotation(),
            r#"{"holderIdentity":"","leaseDurationSeconds":0,"acquireTime":null,"renewTime":null,"leaderTransitions":0}"#
        );
    }

    #[test]
    fn annotations_read() {
        let whole = |r: Record| Record {
            acquire_time: Some(ts("2026-12-05T01:52:33Z")),
            ..r
        };
        let cases: &[(&str, Option<&str>, Record)] = &[
            ("absent: free", None, Record::default()),
            (
                "what we write reads back (whole seconds)",
                Some(&*mk_record("mic-a<&>").to_annotation()),
                whole(mk_record("mic-a<&>")),
            ),
            (
                "Go's upstream mic",
                Some(
                    r#"{"holderIdentity":"go-mic-0","leaseDurationSeconds":4,"acquireTime":"2026-12-05T01:52:33Z","renewTime":"2026-12-05T02:52:40+01:00","leaderTransitions":0}"#,
                ),
                Record {
                    holder: "go-mic-0".into(),
                    lease_duration_seconds: 4,
                    acquire_time: Some(ts("2026-12-05T01:52:33Z")),
                    renew_time: Some(ts("2026-12-05T01:52:40Z")),
                    leader_transitions: 0,
                },
            ),
            (
                "released by client-go",
                Some(
                    r#"{"holderIdentity":"","leaseDurationSeconds":1,"acquireTime":"2026-12-05T01:52:33Z","renewTime":"2026-12-05T01:52:33Z","leaderTransitions":2}"#,
                ),
                Record {
                    holder: String::new(),
                    lease_duration_seconds: 1,
                    acquire_time: Some(ts("2026-12-05T01:52:33Z")),
                    renew_time: Some(ts("2026-12-05T01:52:33Z")),
                    leader_transitions: 2,
                },
            ),
            ("empty object: free", Some("{}"), Record::default()),
            (
                "null fields and unknown ones",
                Some(r#"{"holderIdentity":null,"acquireTime":null,"x":1}"#),
                Record::default(),
            ),
            (
                "not JSON",
                Some("garbage"),
                Record {
                    holder: UNKNOWN_HOLDER.into(),
                    ..Record::default()
                },
            ),
            (
                "a time Go cannot parse",
                Some(r#"{"holderIdentity":"x","renewTime":"yesterday"}"#),
                Record {
                    holder: UNKNOWN_HOLDER.into(),
                    ..Record::default()
                },
            ),
            (
                "empty string",
                Some(""),
                Record {
                    holder: UNKNOWN_HOLDER.into(),
                    ..Record::default()
                },
            ),
        ];
        for (what, annotation, want) in cases {
            assert_eq!(&Record::from_annotation(*annotation), want, "{what}");
        }
    }

    #[test]
    fn lease_round_trip_keeps_precision_and_other_fields() {
        let mut spec = LeaseSpec {
            strategy: Some("OldestEmulationVersion".into()),
            ..Default::default()
        };
        let r = mk_record("mic-a");
        r.apply_to_lease(&mut spec);
        assert_eq!(Record::from_lease(Some(&spec)), r);
        assert_eq!(spec.strategy.as_deref(), Some("OldestEmulationVersion"));
        assert_eq!(spec.holder_identity.as_deref(), Some("mic-a"));

        // Released: no holder identity at all.
        let released = Record {
            holder: String::new(),
            ..r
        };
        released.apply_to_lease(&mut spec);
        assert_eq!(spec.holder_identity, None);
        assert_eq!(Record::from_lease(Some(&spec)), released);
        assert_eq!(Record::from_lease(None), Record::default());
    }
}
