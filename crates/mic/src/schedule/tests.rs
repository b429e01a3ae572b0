use super::*;
use crate::plan::ResourceWork;

fn s(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

fn vmss(n: &str) -> ResourceRef {
    ResourceRef::vmss(n)
}

/// Writes granted at each second of the timeline, for one resource.
fn granted(budget: &mut Budget, r: &ResourceRef, times: &[u64]) -> Vec<bool> {
    times
        .iter()
        .map(|t| budget.try_acquire(r, s(*t)).is_ok())
        .collect()
}

#[test]
fn burst_then_refill_per_resource() {
    // (case, timeline of write attempts in seconds, expected grants)
    let burst12: Vec<u64> = vec![0; 13];
    let mut expected = vec![true; 12];
    expected.push(false);
    let cases: Vec<(&str, Vec<u64>, Vec<bool>)> = vec![
        ("burst of 12, the 13th waits", burst12, expected),
        // After the burst, one token every 15 s (4/min).
        (
            "refill 4 per minute",
            [vec![0; 12], vec![14, 15, 16, 30]].concat(),
            [vec![true; 12], vec![false, true, false, true]].concat(),
        ),
        (
            "refill caps at the burst",
            {
                let mut v = vec![0];
                v.extend(std::iter::repeat_n(3600, 13));
                v
            },
            {
                let mut v = vec![true; 13];
                v.push(false);
                v
            },
        ),
    ];
    for (case, times, want) in cases {
        let mut b = Budget::new(Limits::default());
        assert_eq!(granted(&mut b, &vmss("a"), &times), want, "{case}");
    }
}

#[test]
fn wait_says_when_the_next_token_arrives() {
    let mut b = Budget::new(Limits::default());
    let r = vmss("a");
    for _ in 0..12 {
        assert!(b.try_acquire(&r, s(0)).is_ok());
    }
    assert_eq!(b.try_acquire(&r, s(0)), Err(s(15)));
    assert_eq!(b.try_acquire(&r, s(10)), Err(s(5)));
    assert_eq!(b.wait(&r, s(15)), None);
}

#[test]
fn scale_sets_have_their_own_buckets_and_share_the_subscription() {
    let limits = Limits {
        resource: BucketSpec {
            burst: 2.0,
            per_minute: 1.0,
        },
        subscription: BucketSpec {
            burst: 3.0,
            per_minute: 60.0,
        },
    };
    let mut b = Budget::new(limits);
    let (a, c) = (vmss("a"), vmss("c"));
    assert!(b.try_acquire(&a, s(0)).is_ok());
    assert!(b.try_acquire(&a, s(0)).is_ok());
    assert!(b.try_acquire(&a, s(0)).is_err(), "a's own bucket is empty");
    assert!(b.try_acquire(&c, s(0)).is_ok(), "c is not held back by a");
    assert_eq!(
        b.try_acquire(&c, s(0)),
        Err(s(1)),
        "the subscription bucket is spent"
    );
    assert!(b.try_acquire(&c, s(1)).is_ok());
}

#[test]
fn the_header_corrects_the_mirror() {
    // (case, header, expected (resource, subscription) tokens after)
    let cases = [
        (
            "emulator names",
            "Microsoft.Compute/VMScaleSetUpdateResource;3,Microsoft.Compute/VMScaleSetUpdateSubscriptionMaximum;100",
            (3.0, 100.0),
        ),
        (
            "3-min and 30-min pairs: the smaller wins",
            "Microsoft.Compute/PutVM3Min;239,Microsoft.Compute/PutVM30Min;5",
            (5.0, 1500.0),
        ),
        (
            "never above the burst",
            "Microsoft.Compute/PutVM3Min;239",
            (12.0, 1500.0),
        ),
        (
            "empty bucket",
            "Microsoft.Compute/VMScaleSetUpdateResource;0",
            (0.0, 1500.0),
        ),
        (
            "garbage is ignored",
            "nonsense,;;,Microsoft.Compute/X;-1",
            (12.0, 1500.0),
        ),
    ];
    for (case, header, want) in cases {
        let mut b = Budget::new(Limits::default());
        let r = vmss("a");
        b.observe_remaining(&r, header, s(0));
        assert_eq!(b.tokens(&r, s(0)), want, "{case}");
    }
}

#[test]
fn an_empty_header_bucket_makes_mic_wait() {
    let mut b = Budget::new(Limits::default());
    let r = vmss("a");
    b.observe_remaining(&r, "Microsoft.Compute/VMScaleSetUpdateResource;0", s(100));
    assert_eq!(b.try_acquire(&r, s(100)), Err(s(15)));
    assert!(b.try_acquire(&r, s(115)).is_ok());
}

#[test]
fn retry_after_pauses_only_that_resource() {
    let mut b = Budget::new(Limits::default());
    let (a, c) = (vmss("a"), vmss("c"));
    b.observe_retry_after(&a, s(60), s(0));
    assert_eq!(b.wait(&a, s(0)), Some(s(60)));
    assert_eq!(b.wait(&c, s(0)), None);
    assert!(b.try_acquire(&a, s(59)).is_err());
    assert!(
        b.try_acquire(&a, s(60)).is_ok(),
        "one token when the wait ends"
    );
    assert!(b.try_acquire(&a, s(60)).is_err(), "and only one");
}

#[test]
fn retry_after_overrides_the_mirror_both_ways() {
    // (case, limits, tokens spent first, Retry-After seconds)
    let slow = Limits {
        resource: BucketSpec {
            burst: 3.0,
            per_minute: 0.6,
        },
        ..Limits::default()
    };
    let cases = [
        ("full bucket, short wait", slow, 1, 1),
        (
            "empty bucket, short wait: ARM says one is there",
            slow,
            3,
            1,
        ),
        ("default limits, long wait", Limits::default(), 0, 120),
    ];
    for (case, limits, spent, after) in cases {
        let mut b = Budget::new(limits);
        let r = vmss("a");
        for _ in 0..spent {
            assert!(b.try_acquire(&r, s(0)).is_ok(), "{case}");
        }
        b.observe_retry_after(&r, s(after), s(0));
        assert_eq!(b.wait(&r, s(0)), Some(s(after)), "{case}");
        assert!(b.try_acquire(&r, s(after)).is_ok(), "{case}");
        assert!(b.try_acquire(&r, s(after)).is_err(), "{case}");
    }
}

#[test]
fn parse_remaining_entries() {
    assert_eq!(
        parse_remaining(
            "Microsoft.Compute/GetVMScaleSet3Min;197, Microsoft.Compute/GetVMScaleSet30Min;1297"
        ),
        vec![
            Remaining {
                policy: "GetVMScaleSet3Min".into(),
                remaining: 197
            },
            Remaining {
                policy: "GetVMScaleSet30Min".into(),
                remaining: 1297
            },
        ]
    );
    assert!(parse_remaining("").is_empty());
}

fn id(n: &str) -> String {
    format!(
        "/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/{n}"
    )
}

fn aai(n: &str) -> (String, String) {
    ("default".to_string(), n.to_string())
}

/// A plan that retires AAI `a` holding `ids` on vmss `x`.
fn retiring(ids: &[&str]) -> Plan {
    let mut p = Plan::default();
    let w = p.resources.entry(vmss("x")).or_default();
    for n in ids {
        w.remove.insert(id(n));
        w.delete_on_success.push((aai(n), id(n)));
    }
    p
}

#[test]
fn zero_linger_removes_at_once() {
    let mut l = Linger::new(Duration::ZERO);
    let mut p = retiring(&["one"]);
    assert_eq!(l.hold(&mut p, s(0)), None);
    assert_eq!(p.resources[&vmss("x")].remove.len(), 1);
}

#[test]
fn linger_timeline() {
    // (step, time, plan's retiring identities, expected removals sent, expected wake-up)
    type Step = (
        &'static str,
        u64,
        Vec<&'static str>,
        Vec<&'static str>,
        Option<u64>,
    );
    let steps: Vec<Step> = vec![
        ("pod gone: held", 0, vec!["one"], vec![], Some(300)),
        ("still held", 100, vec!["one"], vec![], Some(200)),
        (
            "second identity starts its own clock",
            200,
            vec!["one", "two"],
            vec![],
            Some(100),
        ),
        (
            "first falls due",
            300,
            vec!["one", "two"],
            vec!["one"],
            Some(200),
        ),
        (
            "pod came back for two: clock forgotten",
            400,
            vec![],
            vec![],
            None,
        ),
        (
            "two unneeded again: fresh linger",
            450,
            vec!["two"],
            vec![],
            Some(300),
        ),
        ("due", 750, vec!["two"], vec!["two"], None),
    ];
    let mut l = Linger::new(s(300));
    for (step, t, retire, want, wake) in steps {
        let mut p = retiring(&retire);
        let next = l.hold(&mut p, s(t));
        let sent: Vec<String> = p
            .resources
            .get(&vmss("x"))
            .map(|w| w.remove.iter().cloned().collect())
            .unwrap_or_default();
        let want: Vec<String> = want.iter().map(|n| id(n)).collect();
        assert_eq!(sent, want, "{step}");
        let deletes: Vec<String> = p
            .resources
            .get(&vmss("x"))
            .map(|w| w.delete_on_success.iter().map(|(_, i)| i.clone()).collect())
            .unwrap_or_default();
        assert_eq!(deletes, want, "{step}: AAIs leave only with their removal");
        assert_eq!(next, wake.map(s), "{step}");
    }
}

#[test]
fn linger_keeps_adds_and_unheld_removals() {
    let mut l = Linger::new(s(60));
    let mut p = retiring(&["old"]);
    let w: &mut ResourceWork = p.resources.entry(vmss("x")).or_default();
    w.add.insert(id("new"));
    w.assign_on_success.push((aai("new"), id("new")));
    // A removal no AAI waits on (an edited identity) is never held.
    w.remove.insert(id("edited"));
    l.hold(&mut p, s(0));
    let w = &p.resources[&vmss("x")];
    assert!(w.add.contains(&id("new")));
    assert_eq!(
        w.remove.iter().cloned().collect::<Vec<_>>(),
        vec![id("edited")]
    );
    assert!(w.delete_on_success.is_empty());
}

#[test]
fn fully_held_resources_leave_the_plan() {
    let mut l = Linger::new(s(60));
    let mut p = retiring(&["one"]);
    l.hold(&mut p, s(0));
    assert!(p.is_empty());
}

#[test]
fn read_policies_of_a_get_answer_never_correct_the_write_mirror() {
    let r = vmss("a");
    // (header, resource tokens after 5 writes and the header)
    let cases = [
        // A GET answer lists only read policies.
        (
            "Microsoft.Compute/GetVMScaleSet3Min;197,Microsoft.Compute/GetVMScaleSet30Min;1297",
            7.0,
        ),
        (
            "Microsoft.Compute/HighCostGetVMScaleSet3Min;0,Microsoft.Compute/LowCostGet30Min;5",
            7.0,
        ),
        // A write policy, on whatever answer, is taken.
        ("Microsoft.Compute/PutVMScaleSetResource;2", 2.0),
        (
            "Microsoft.Compute/GetVMScaleSet3Min;0,Microsoft.Compute/PutVMScaleSetResource;9",
            9.0,
        ),
    ];
    for (header, want) in cases {
        let mut b = Budget::new(Limits::default());
        for _ in 0..5 {
            b.try_acquire(&r, s(0)).unwrap();
        }
        b.observe_remaining(&r, header, s(0));
        assert_eq!(b.tokens(&r, s(0)).0, want, "{header}");
    }
}

#[test]
fn subscription_writes_header_only_lowers_the_subscription_bucket() {
    let r = vmss("a");
    let mut b = Budget::new(Limits::default());
    b.try_acquire(&r, s(0)).unwrap();
    // ARM's layer has more left than Compute's bucket: nothing changes.
    b.observe_subscription_writes(12_000, s(0));
    assert_eq!(b.tokens(&r, s(0)).1, 1499.0);
    // Fewer (ARM's older model: 1,200 writes an hour): lowered.
    b.observe_subscription_writes(1199, s(0));
    assert_eq!(b.tokens(&r, s(0)).1, 1199.0);
    // It has less: the mirror follows, and a write waits for the refill.
    b.observe_subscription_writes(0, s(0));
    assert_eq!(b.tokens(&r, s(0)).1, 0.0);
    assert!(b.try_acquire(&vmss("other"), s(0)).is_err());
    // 500/min: one token after 0.12 s.
    assert!(
        b.try_acquire(&vmss("other"), Duration::from_millis(200))
            .is_ok()
    );
}

#[test]
fn a_change_after_a_quiet_spell_starts_a_cycle_at_once() {
    let ms = Duration::from_millis;
    let debounce = ms(50);
    // (case, last cycle's start and length, change seen at, cycle starts at), in ms
    type Row = (&'static str, Option<(u64, u64)>, u64, u64);
    let rows: &[Row] = &[
        ("no cycle yet", None, 7, 7),
        ("long after the last cycle", Some((0, 5)), 1_000, 1_000),
        ("just as the debounce ends", Some((100, 5)), 150, 150),
        ("close behind a cycle: folded", Some((100, 5)), 120, 150),
        ("at the same instant", Some((100, 5)), 100, 150),
        (
            "a long cycle keeps the next away",
            Some((100, 40)),
            120,
            260,
        ),
        ("long after a long cycle", Some((100, 40)), 300, 300),
    ];
    for &(case, last, now, want) in rows {
        assert_eq!(
            cycle_at(last.map(|(a, b)| (ms(a), ms(b))), ms(now), debounce),
            ms(want),
            "{case}"
        );
    }
}
