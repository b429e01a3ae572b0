//! Row 6: the in-place migration, from the test kit's scenario
//! ([`aadpodid_testkit::world::upgrade::run`], the one the test
//! `migration_upgrade` asserts on), on the Helm path users take most:
//! upstream's chart 4.1.18 installed and upstream's Go mic and nmi first,
//! then this project's CRDs and `helm upgrade` to this chart, and this
//! project's processes (nmi surged node by node, mic replicas beside Go's,
//! Go stopped), then `helm rollback` and back (delete first, as upstream's
//! chart rolls). One run fills both columns: "this project" holds the
//! upgrade to it, "upstream" the rollback to upstream.

use aadpodid_testkit::world::Options as WorldOptions;
use aadpodid_testkit::world::upgrade::{self, Sides, UpgradeFigures, UpgradePath, UpgradePlan};

use crate::report::{Figures, Metric};
use crate::shipped::Shipped;
use crate::subject::{Subject, available};

/// The metrics of row 6.
fn metrics() -> impl Iterator<Item = Metric> {
    Metric::all().into_iter().filter(|m| m.row() == 6)
}

/// The world of the run: two nodes (one per scale set), two pods each, three
/// identities; the kit's own relay (it logs who reached IMDS).
fn world_options() -> WorldOptions {
    let mut opts = WorldOptions::new("/unused", "/unused");
    opts.scale_sets = 2;
    opts.instances = 1;
    opts.pods_per_node = 2;
    opts.identities = 3;
    opts
}

/// Runs the migration and fills row 6 of both columns (or says why not).
pub async fn row(columns: &mut [(Subject, Figures)], no_upstream: bool, shipped: &Shipped) {
    let reason = if no_upstream {
        Some("not run: --no-upstream".to_string())
    } else {
        available(Subject::Upstream).err()
    };
    if let Some(reason) = reason {
        fill(columns, &reason);
        return;
    }
    eprintln!("row 6: in-place migration upstream -> this project -> upstream");
    match measure(shipped).await {
        Ok(run) => {
            eprintln!("{}", run.blocks());
            for (subject, f) in columns.iter_mut() {
                let figures = match subject {
                    Subject::ThisProject => &run.upgrade,
                    Subject::Upstream => &run.rollback,
                };
                record(f, figures);
            }
        }
        Err(e) => fill(columns, &format!("failed: {e:#}")),
    }
}

async fn measure(shipped: &Shipped) -> anyhow::Result<upgrade::UpgradeRun> {
    let sides = Sides {
        upstream_mic: aadpodid_testkit::world::Program::upstream("mic")?,
        upstream_nmi: aadpodid_testkit::world::Program::upstream("nmi")?,
        our_mic: shipped.mic_program(),
        // Not pinned: two nodes' nmis run at once here.
        our_nmi: aadpodid_testkit::world::Program::binary(&shipped.nmi),
    };
    let mut plan = UpgradePlan::new(sides);
    plan.path = UpgradePath::Helm;
    upgrade::run(world_options(), &plan).await
}

/// Every cell of row 6 in every column says `text`.
fn fill(columns: &mut [(Subject, Figures)], text: &str) {
    let short: String = text
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    for (_, f) in columns.iter_mut() {
        for m in metrics() {
            f.set_text(m, &short);
        }
    }
}

/// Row 6's cells and a note from one direction's figures.
fn record(f: &mut Figures, u: &UpgradeFigures) {
    f.set(Metric::MigrationDuration, u.duration.as_secs_f64());
    match u.takeover {
        Some(t) => f.set(Metric::MigrationTakeover, t.as_secs_f64()),
        None => f.set_text(Metric::MigrationTakeover, "no takeover seen"),
    }
    f.set(
        Metric::MigrationArmWrites,
        u.arm_writes.values().sum::<usize>() as f64,
    );
    let a = u.aai;
    f.set(
        Metric::MigrationAaiChanges,
        (a.status_changes + a.rewrites + a.recreates + a.created) as f64,
    );
    f.set(Metric::MigrationTokenErrors, u.token_error_count() as f64);
    f.set(Metric::MigrationImdsDirect, u.imds_direct as f64);
    f.note(note(u));
}

/// The details of one direction, on one line.
fn note(u: &UpgradeFigures) -> String {
    let objects: Vec<String> = u.objects.iter().map(|o| o.line()).collect();
    let tenures: Vec<String> = u
        .tenures
        .iter()
        .map(|t| format!("{} {} {:.1} s", t.lock, t.holder, t.held().as_secs_f64()))
        .collect();
    format!(
        "row 6 ({}, Helm path: {}): {} token requests, errors {:?}; ARM writes {:?}, reads {:?}; AAI changes {:?}; locks seen held: {}; two mics acting: {}; needed identities removed: {}; pods without a token after: {}",
        u.name,
        objects.join("; "),
        u.token_requests,
        u.token_errors,
        u.arm_writes,
        u.arm_reads,
        u.aai,
        tenures.join(", "),
        u.conflicts.len(),
        u.removed_needed.len(),
        u.failures_after.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use aadpodid_testkit::world::upgrade::ObjectStep;
    use std::time::Duration;

    #[test]
    fn one_direction_fills_every_cell_of_row_6() {
        let mut u = UpgradeFigures {
            name: "upgrade".into(),
            duration: Duration::from_millis(26_800),
            takeover: Some(Duration::from_millis(3900)),
            token_requests: 400,
            imds_direct: 0,
            objects: vec![ObjectStep {
                name: "helm upgrade".into(),
                took: Duration::from_millis(600),
                replaced: 13,
                created: 12,
                deleted: 1,
                images: vec!["nmi:v0.1.0-rs.0".into()],
            }],
            ..Default::default()
        };
        u.token_errors.insert("NoAnswer".into(), 4);
        let mut f = Figures::default();
        record(&mut f, &u);
        assert_eq!(metrics().count(), 6);
        for m in metrics() {
            assert!(f.value(m).is_some(), "{m:?}");
        }
        assert_eq!(f.value(Metric::MigrationTokenErrors), Some(4.0));
        assert_eq!(f.value(Metric::MigrationTakeover), Some(3.9));
        assert!(
            f.notes[0].starts_with(
                "row 6 (upgrade, Helm path: helm upgrade (600.00ms): 13 replaced, 12 created, 1 deleted; nmi:v0.1.0-rs.0): 400 token requests"
            ),
            "{}",
            f.notes[0]
        );
        let mut cols = vec![(Subject::ThisProject, Figures::default())];
        fill(&mut cols, "not run: x\nmore");
        assert_eq!(
            cols[0]
                .1
                .get(Metric::MigrationImdsDirect)
                .map(|c| c.render()),
            Some("not run: x".into())
        );
    }
}
