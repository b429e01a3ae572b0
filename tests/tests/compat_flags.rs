//! klog's flags on the command lines of this project's `mic` and `nmi` and
//! of upstream v1.8.17's Go binaries (built from their Go module): every
//! command line upstream's binary takes, ours takes too, and the values
//! upstream's refuses, ours refuses. `--version` makes each binary stop
//! right after parsing, so no cluster is needed; mic prints its warning
//! naming the klog flags that have no effect before that.

use std::path::Path;
use std::process::Output;

use aadpodid_tests::upstream::upstream_bin_dir;
use anyhow::Context as _;

/// Runs `bin` with `args` (and `MIC_POD_NAMESPACE`, which both mics check
/// before `--version`).
fn run(bin: &Path, args: &[&str]) -> anyhow::Result<Output> {
    std::process::Command::new(bin)
        .args(args)
        .env("MIC_POD_NAMESPACE", "default")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("run {}", bin.display()))
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A scratch folder for klog's `--log_dir`/`--log_file` (upstream's klog may
/// create files there).
fn scratch(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("aadpodid-compat-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The command lines both binaries of one kind must take (each with
/// `--version` last) and those both must refuse.
struct Cases {
    accepted: Vec<Vec<String>>,
    refused: Vec<Vec<String>>,
}

fn check(ours: &Path, upstream: &Path, cases: &Cases) -> anyhow::Result<()> {
    for args in &cases.accepted {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let up = run(upstream, &args)?;
        assert!(
            up.status.success(),
            "upstream takes {args:?}:\n{}",
            text(&up)
        );
        let o = run(ours, &args)?;
        assert!(o.status.success(), "ours takes {args:?}:\n{}", text(&o));
    }
    for args in &cases.refused {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let up = run(upstream, &args)?;
        assert!(
            !up.status.success(),
            "upstream refuses {args:?}:\n{}",
            text(&up)
        );
        let o = run(ours, &args)?;
        assert!(!o.status.success(), "ours refuses {args:?}:\n{}", text(&o));
    }
    Ok(())
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Upstream MIC parsed with Go's `flag`: one or two dashes, values after
/// `=` or as the next word (booleans only after `=`).
#[test]
fn mic_takes_every_klog_flag_upstream_took() -> anyhow::Result<()> {
    let upstream = upstream_bin_dir()?.join("mic");
    let ours = Path::new(env!("CARGO_BIN_EXE_e2e-mic"));
    let dir = scratch("mic")?;
    let log_dir = dir.display().to_string();
    let log_file = dir.join("mic.log").display().to_string();
    let every = [
        "-logtostderr",
        "--alsologtostderr=false",
        "-v",
        "2",
        "-log_dir",
        &log_dir,
        &format!("--log_file={log_file}"),
        "-log_file_max_size=0x10",
        "-add_dir_header",
        "--skip_headers=false",
        "-skip_log_headers=true",
        "-one_output=1",
        "-stderrthreshold",
        "WARNING",
        "--vmodule=mic*=3,",
        "-log_backtrace_at",
        "mic.go:12",
        "--version",
    ];
    let cases = Cases {
        accepted: vec![
            strings(&every),
            strings(&["--logtostderr", "--v=4", "--version"]),
            strings(&["-v=0", "-stderrthreshold=2", "-version"]),
            strings(&["--log_backtrace_at=", "--vmodule", "", "--version"]),
        ],
        refused: vec![
            strings(&["-stderrthreshold=DEBUG", "--version"]),
            strings(&["-vmodule=mic", "--version"]),
            strings(&["-vmodule=mic=-1", "--version"]),
            strings(&["-log_backtrace_at=mic:12", "--version"]),
            strings(&["-log_file_max_size=-1", "--version"]),
            strings(&["-skip_headers=yes", "--version"]),
            strings(&["-v=x", "--version"]),
            strings(&["-no_such_klog_flag", "--version"]),
        ],
    };
    check(ours, &upstream, &cases)?;

    // Ours names what has no effect, once, in klog's order.
    let o = run(
        ours,
        &strings(&every)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("klog flags accepted for compatibility"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", text(&o));
    assert!(
        warnings[0].contains(
            "--log_dir, --log_file, --log_file_max_size, --add_dir_header, --skip_headers, --one_output, --skip_log_headers, --stderrthreshold, --vmodule, --log_backtrace_at"
        ),
        "{}",
        warnings[0]
    );
    let o = run(ours, &["--logtostderr", "--v=2", "--version"])?;
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("klog flags"),
        "no warning for upstream's own manifests:\n{}",
        text(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Upstream NMI parsed with pflag (klog's Go flags added to it): two dashes,
/// values after `=` or as the next word (booleans only after `=`), `-v` also
/// a short flag.
#[test]
fn nmi_takes_every_klog_flag_upstream_took() -> anyhow::Result<()> {
    let upstream = upstream_bin_dir()?.join("nmi");
    let ours = Path::new(env!("CARGO_BIN_EXE_e2e-nmi"));
    let dir = scratch("nmi")?;
    let log_dir = dir.display().to_string();
    let log_file = dir.join("nmi.log").display().to_string();
    let cases = Cases {
        accepted: vec![
            strings(&[
                "--logtostderr=true",
                "--alsologtostderr",
                "-v",
                "3",
                "--log_dir",
                &log_dir,
                &format!("--log_file={log_file}"),
                "--log_file_max_size=100",
                "--add_dir_header=true",
                "--skip_headers",
                "--skip_log_headers=false",
                "--one_output",
                "--stderrthreshold=error",
                "--vmodule",
                "server=4",
                "--log_backtrace_at=server.go:99",
                "--version",
            ]),
            strings(&["--v=5", "--version"]),
            strings(&["-v=5", "--version"]),
            strings(&["--logtostderr", "--version"]),
        ],
        refused: vec![
            strings(&["--stderrthreshold=DEBUG", "--version"]),
            strings(&["--vmodule=server", "--version"]),
            strings(&["--log_backtrace_at=server", "--version"]),
            strings(&["--log_file_max_size=-1", "--version"]),
            strings(&["--one_output=maybe", "--version"]),
            // pflag takes long flags with two dashes only.
            strings(&["-log_dir=/tmp", "--version"]),
            strings(&["--no_such_klog_flag", "--version"]),
        ],
    };
    check(ours, &upstream, &cases)?;

    // Ours names what has no effect, once (NMI's level comes from RUST_LOG,
    // so a non-zero -v is named too).
    let o = run(
        ours,
        &cases.accepted[0]
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("klog flags accepted for compatibility"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", text(&o));
    for name in ["--log_dir", "--vmodule", "--log_backtrace_at", "-v"] {
        assert!(warnings[0].contains(name), "{name}: {}", warnings[0]);
    }
    let o = run(ours, &["--logtostderr", "--version"])?;
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("klog flags"),
        "{}",
        text(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
