//! `bench --quick` runs end to end: it prints the table with a number in
//! every cell of this project's column and writes the Markdown report and
//! the SVG chart. It checks that the program works, not how fast anything is.
//! The shipped `mic` and `nmi` are built first (a release build, outside the
//! run's time bound), as the bench builds them, and given to it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Bound on the whole quick run (cluster start, both subjects, all rows).
const TIMEOUT: Duration = Duration::from_secs(900);

#[test]
fn bench_quick_prints_a_numeric_table() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(aadpodid_testkit::unique_name("bench-quick"));
    std::fs::create_dir_all(&dir)?;
    let md = dir.join("benchmarks.md");
    let shipped = aadpodid_bench::shipped::Shipped::locate(None, None)?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_bench"))
        .arg("--quick")
        .arg("--out")
        .arg(&md)
        .arg("--mic-bin")
        .arg(&shipped.mic)
        .arg("--nmi-bin")
        .arg(&shipped.nmi)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawn bench")?;
    let deadline = Instant::now() + TIMEOUT;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("bench --quick did not finish within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bench failed ({}):\n{stdout}",
        out.status
    );

    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with('|')).collect();
    let header: Vec<&str> = cells(lines.first().context("no table printed")?);
    assert_eq!(
        header,
        ["#", "metric", "this project", "upstream v1.8.17"],
        "{stdout}"
    );
    // Header, separator, then one line per metric of rows 1-5, 7 and 8.
    let body = &lines[2..];
    assert!(body.len() >= 5, "{stdout}");
    assert!(
        body.iter()
            .any(|l| l.contains("open loop at 10000 tokens/s: p99")),
        "{stdout}"
    );
    let mut rows_seen = std::collections::BTreeSet::new();
    for line in body {
        let c = cells(line);
        assert_eq!(c.len(), 4, "{line}");
        rows_seen.insert(c[0].to_string());
        let value: f64 = c[2]
            .parse()
            .with_context(|| format!("this project's cell is not a number: {line}"))?;
        assert!(value.is_finite(), "{line}");
        // The upstream column holds a number or says why it did not run.
        assert!(
            c[3].parse::<f64>().is_ok()
                || c[3].starts_with("not run")
                || c[3].starts_with("failed"),
            "{line}"
        );
    }
    assert_eq!(
        rows_seen.into_iter().collect::<Vec<_>>(),
        ["1", "2", "3", "4", "5", "7", "8"],
        "{stdout}"
    );
    // Row 8: pods with a federated identity cause no ARM write.
    for metric in ["federated: ARM writes", "federated: IMDS token requests"] {
        let line = body
            .iter()
            .find(|l| l.contains(metric))
            .with_context(|| format!("no {metric:?} line:\n{stdout}"))?;
        assert_eq!(cells(line)[2], "0", "{line}");
    }

    let report = std::fs::read_to_string(&md)?;
    assert!(report.contains("| # | metric | this project |"), "{report}");
    assert!(report.contains("CPUs"), "{report}");
    let svg = std::fs::read_to_string(md.with_extension("svg"))?;
    assert!(svg.starts_with("<svg") && svg.contains("<rect"), "{svg}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn cells(line: &str) -> Vec<&str> {
    line.trim()
        .trim_matches('|')
        .split('|')
        .map(str::trim)
        .collect()
}
