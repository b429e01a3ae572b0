use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Milliseconds, so each table row fits on one line.
type Ms = u64;
type Window = Option<(Ms, Ms)>;
/// (name, elapsed, Retry-After just received, latest Retry-After, window, wait)
type DelayRow = (&'static str, Ms, Option<Ms>, Option<Ms>, Window, Ms);
/// (name, the write's Retry-After, window, L, most lag, most polls)
type LagRow = (&'static str, Option<Ms>, Window, Ms, Ms, u32);

fn d(ms: Ms) -> Duration {
    Duration::from_millis(ms)
}

fn window(w: Window) -> Option<(Duration, Duration)> {
    w.map(|(lo, hi)| (d(lo), d(hi)))
}

#[test]
fn next_delay_table() {
    let p = PollPolicy::default();
    let rows: &[DelayRow] = &[
        (
            "no hint, nothing learned: fallback",
            0,
            None,
            None,
            None,
            5_000,
        ),
        (
            "the write's Retry-After",
            0,
            Some(1_000),
            Some(1_000),
            None,
            1_000,
        ),
        (
            "a status answer without one: keep the write's",
            3_000,
            None,
            Some(1_000),
            None,
            1_000,
        ),
        (
            "a status answer's Retry-After",
            3_000,
            Some(7_000),
            Some(7_000),
            None,
            7_000,
        ),
        (
            "Retry-After 0: the least spacing",
            3_000,
            Some(0),
            Some(0),
            None,
            100,
        ),
        (
            "before the window: usual spacing",
            0,
            Some(1_000),
            Some(1_000),
            Some((40_000, 60_000)),
            1_000,
        ),
        (
            "there when the window opens",
            38_500,
            None,
            Some(1_000),
            Some((40_000, 60_000)),
            500,
        ),
        (
            "inside the window: span / window_polls",
            41_000,
            None,
            Some(1_000),
            Some((40_000, 60_000)),
            1_000,
        ),
        (
            "narrow window: the least spacing",
            4_450,
            None,
            Some(1_000),
            Some((4_400, 4_500)),
            100,
        ),
        (
            "wide window, no hint",
            41_000,
            None,
            None,
            Some((40_000, 80_000)),
            2_000,
        ),
        (
            "just after the window: its spacing, doubled",
            62_000,
            None,
            None,
            Some((40_000, 60_000)),
            2_000,
        ),
        (
            "well after the window: usual spacing",
            70_000,
            None,
            None,
            Some((40_000, 60_000)),
            5_000,
        ),
        (
            "the write's Retry-After beats the window",
            0,
            Some(10_000),
            Some(10_000),
            Some((2_000, 3_000)),
            10_000,
        ),
        (
            "a long Retry-After is capped",
            0,
            Some(600_000),
            Some(600_000),
            None,
            60_000,
        ),
        ("a window at zero", 0, None, None, Some((0, 50)), 100),
    ];
    for &(name, elapsed, retry_after, last_hint, w, want) in rows {
        let progress = Progress {
            elapsed: d(elapsed),
            retry_after: retry_after.map(d),
            last_hint: last_hint.map(d),
        };
        assert_eq!(next_delay(&p, &progress, window(w)), d(want), "{name}");
    }
}

#[test]
fn endings_keep_the_recent_span() {
    let mut e = Endings::default();
    assert_eq!(e.window(), None);
    e.record(s(4), s(5));
    assert_eq!(e.window(), Some((s(4), s(5))));
    e.record(ms(4_400), ms(4_500));
    assert_eq!(e.window(), Some((s(4), s(5))), "the widest span");
    // An answer that came before the one that found it running.
    e.record(s(9), s(8));
    assert_eq!(e.window(), Some((s(4), s(8))));
    for _ in 0..Endings::KEPT {
        e.record(s(40), s(41));
    }
    assert_eq!(e.window(), Some((s(40), s(41))), "old ones age out");
}

/// Polls one operation of length `l` to its end as the schedule says and
/// returns (time from the end until it was noticed, polls made); the
/// write's answer carried `hint`, status answers carry none (Compute's).
fn run(p: &PollPolicy, hint: Option<Duration>, w: Window, l: Duration) -> (Duration, u32) {
    let mut t = Duration::ZERO;
    let mut retry_after = hint;
    let mut polls = 0;
    loop {
        let progress = Progress {
            elapsed: t,
            retry_after,
            last_hint: hint,
        };
        t += next_delay(p, &progress, window(w));
        polls += 1;
        if t >= l {
            return (t - l, polls);
        }
        retry_after = None;
        assert!(polls < 1000, "never ends");
    }
}

#[test]
fn lag_and_reads_per_operation() {
    let p = PollPolicy::default();
    // The emulator at 10x sends Retry-After 5 s as 1 s; its L of 45 s is 4.5 s.
    // Real ARM: no Retry-After at all, L from 40 to 60 s.
    let rows: &[LagRow] = &[
        (
            "fast clock, first operation",
            Some(1_000),
            None,
            4_500,
            500,
            5,
        ),
        (
            "fast clock, learned",
            Some(1_000),
            Some((4_000, 5_000)),
            4_500,
            100,
            12,
        ),
        (
            "fast clock, learned narrow",
            Some(1_000),
            Some((4_400, 4_600)),
            4_500,
            100,
            8,
        ),
        ("real, first operation", None, None, 45_000, 5_000, 9),
        (
            "real, learned 40-60 s",
            None,
            Some((40_000, 60_000)),
            45_000,
            1_000,
            14,
        ),
        (
            "real, learned 40-60 s, slowest",
            None,
            Some((40_000, 60_000)),
            60_000,
            1_000,
            29,
        ),
        (
            "fast clock, a little longer than ever seen",
            Some(1_000),
            Some((4_000, 5_000)),
            5_300,
            100,
            18,
        ),
        (
            "fast clock, much longer than ever seen",
            Some(1_000),
            Some((4_000, 5_000)),
            8_000,
            600,
            22,
        ),
        (
            "real, a little longer than ever seen",
            None,
            Some((40_000, 60_000)),
            63_000,
            1_000,
            32,
        ),
        // Two reads more than at the usual spacing past the window (36),
        // for a lag of at most 3 s instead of 5 s.
        (
            "real, longer than ever seen",
            None,
            Some((40_000, 60_000)),
            90_000,
            3_000,
            38,
        ),
        (
            "real, shorter than ever seen",
            None,
            Some((40_000, 60_000)),
            20_000,
            5_000,
            4,
        ),
    ];
    for &(name, hint, w, l, most_lag, most_polls) in rows {
        let (lag, polls) = run(&p, hint.map(d), w, d(l));
        assert!(lag <= d(most_lag), "{name}: lag {lag:?} > {most_lag} ms");
        assert!(polls <= most_polls, "{name}: {polls} polls > {most_polls}");
    }
}
