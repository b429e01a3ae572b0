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
    let accepted = cases.accepted.iter().map(|args| (args, true));
    let refused = cases.refused.iter().map(|args| (args, false));
    for (args, takes) in accepted.chain(refused) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let verb = if takes { "takes" } else { "refuses" };
        for (who, bin) in [("upstream", upstream), ("ours", ours)] {
            let o = run(bin, &args)?;
            assert_eq!(
                o.status.success(),
                takes,
                "{who} {verb} {args:?}:\n{}",
                text(&o)
            );
        }
    }
    Ok(())
}

/// The one line in which ours (`ours` run with `args`) names the klog flags
/// that have no effect; fails unless there is exactly one such line.
fn klog_warning_line(ours: &Path, args: &[String]) -> anyhow::Result<String> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run(ours, &args)?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("klog flags accepted for compatibility"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", text(&o));
    Ok(warnings[0].to_string())
}

/// Fails if ours, run with `args`, names any klog flag in a warning.
fn assert_no_klog_warning(ours: &Path, args: &[&str], why: &str) -> anyhow::Result<()> {
    let o = run(ours, args)?;
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("klog flags"),
        "{why}:\n{}",
        text(&o)
    );
    Ok(())
}

/// Upstream's binary `name`, ours (`ours`), and a scratch folder with the
/// values `--log_dir` and `--log_file` take in it.
struct Setup<'a> {
    upstream: std::path::PathBuf,
    ours: &'a Path,
    dir: std::path::PathBuf,
    log_dir: String,
    log_file: String,
}

impl<'a> Setup<'a> {
    fn new(name: &str, ours: &'a str) -> anyhow::Result<Self> {
        let dir = scratch(name)?;
        Ok(Self {
            upstream: upstream_bin_dir()?.join(name),
            ours: Path::new(ours),
            log_dir: dir.display().to_string(),
            log_file: dir.join(format!("{name}.log")).display().to_string(),
            dir,
        })
    }
}

impl Drop for Setup<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One command line per flag in `flags`: that flag, then `--version`.
fn each_then_version(flags: &[&str]) -> Vec<Vec<String>> {
    flags.iter().map(|f| strings(&[f, "--version"])).collect()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Upstream MIC parsed with Go's `flag`: one or two dashes, values after
/// `=` or as the next word (booleans only after `=`).
#[test]
fn mic_takes_every_klog_flag_upstream_took() -> anyhow::Result<()> {
    let setup = Setup::new("mic", env!("CARGO_BIN_EXE_e2e-mic"))?;
    let (log_dir, log_file) = (&setup.log_dir, &setup.log_file);
    let every = [
        "-logtostderr",
        "--alsologtostderr=false",
        "-v",
        "2",
        "-log_dir",
        log_dir,
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
        refused: each_then_version(&[
            "-stderrthreshold=DEBUG",
            "-vmodule=mic",
            "-vmodule=mic=-1",
            "-log_backtrace_at=mic:12",
            "-log_file_max_size=-1",
            "-skip_headers=yes",
            "-v=x",
            "-no_such_klog_flag",
        ]),
    };
    check(setup.ours, &setup.upstream, &cases)?;

    // Ours names what has no effect, once, in klog's order.
    let warning = klog_warning_line(setup.ours, &strings(&every))?;
    assert!(
        warning.contains(
            "--log_dir, --log_file, --log_file_max_size, --add_dir_header, --skip_headers, --one_output, --skip_log_headers, --stderrthreshold, --vmodule, --log_backtrace_at"
        ),
        "{warning}"
    );
    assert_no_klog_warning(
        setup.ours,
        &["--logtostderr", "--v=2", "--version"],
        "no warning for upstream's own manifests",
    )
}

/// Upstream NMI parsed with pflag (klog's Go flags added to it): two dashes,
/// values after `=` or as the next word (booleans only after `=`), `-v` also
/// a short flag.
#[test]
fn nmi_takes_every_klog_flag_upstream_took() -> anyhow::Result<()> {
    let setup = Setup::new("nmi", env!("CARGO_BIN_EXE_e2e-nmi"))?;
    let (log_dir, log_file) = (&setup.log_dir, &setup.log_file);
    let cases = Cases {
        accepted: vec![
            strings(&[
                "--logtostderr=true",
                "--alsologtostderr",
                "-v",
                "3",
                "--log_dir",
                log_dir,
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
        refused: each_then_version(&[
            "--stderrthreshold=DEBUG",
            "--vmodule=server",
            "--log_backtrace_at=server",
            "--log_file_max_size=-1",
            "--one_output=maybe",
            // pflag takes long flags with two dashes only.
            "-log_dir=/tmp",
            "--no_such_klog_flag",
        ]),
    };
    check(setup.ours, &setup.upstream, &cases)?;

    // Ours names what has no effect, once (NMI's level comes from RUST_LOG,
    // so a non-zero -v is named too).
    let warning = klog_warning_line(setup.ours, &cases.accepted[0])?;
    for name in ["--log_dir", "--vmodule", "--log_backtrace_at", "-v"] {
        assert!(warning.contains(name), "{name}: {warning}");
    }
    assert_no_klog_warning(
        setup.ours,
        &["--logtostderr", "--version"],
        "no warning without klog flags of no effect",
    )
}
