//! Flag values spelled as upstream's Go binaries take them, for mic's and
//! nmi's command lines: Go booleans, klog's flags, and Go's `flag` syntax.
//!
//! Upstream mic and nmi both called klog's `InitFlags` (klog v2.30), so their
//! command lines accept `-v`, `--logtostderr`, `--alsologtostderr` and the
//! ten flags of [`KlogFlags`]. Both binaries here declare `-v` and the two
//! stderr flags themselves and flatten [`KlogFlags`] into their arguments, so
//! a Deployment written for upstream starts; [`klog_without_effect`] names
//! the ones that change nothing here, for one warning at start.
//!
//! Syntax: upstream mic parsed with Go's `flag` package, which takes `-name`
//! and `--name` alike, and a value as `-name=value` or `-name value`
//! (booleans only with `=`); [`go_flag_args`] turns its single-dash long
//! flags into clap's `--name`. Upstream nmi parsed with pflag, where long
//! flags take two dashes and `-v` is also `--v`: clap's own syntax.

use std::ffi::OsString;

/// Go's `strconv.ParseBool`: `1`, `t`, `T`, `TRUE`, `true`, `True` and their
/// false counterparts; anything else is an error naming the value.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        other => Err(format!("invalid boolean value {other:?}")),
    }
}

/// Gives a boolean flag (any argument whose values are `bool`) the syntax
/// of Go's `flag` and of pflag: `--name` alone is true, `--name=VALUE`
/// takes [`parse_go_bool`]'s spellings, and the next word is never its
/// value. Other arguments are returned as they are. A command applies it to
/// all its arguments, flattened ones included, with
/// `#[command(mut_args = go_bool_syntax)]`; each boolean field states only
/// its name and `default_value`.
pub fn go_bool_syntax(arg: clap::Arg) -> clap::Arg {
    if arg.get_value_parser().type_id() != std::any::TypeId::of::<bool>() {
        return arg;
    }
    arg.value_parser(parse_go_bool)
        .num_args(0..=1)
        .require_equals(true)
        .default_missing_value("true")
        .action(clap::ArgAction::Set)
}

/// Go's `strconv.ParseUint(s, 0, 64)`: decimal, `0x`/`0X` hex, `0o`/`0O`
/// or a leading `0` octal, `0b`/`0B` binary; after a base prefix, single
/// underscores may separate digits (and follow the prefix).
pub fn parse_go_uint64(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid unsigned integer {s:?}");
    let (digits, radix, prefixed) = match s.get(..2) {
        Some("0x" | "0X") => (&s[2..], 16, true),
        Some("0o" | "0O") => (&s[2..], 8, true),
        Some("0b" | "0B") => (&s[2..], 2, true),
        _ if s.len() > 1 && s.starts_with('0') => (&s[1..], 8, true),
        _ => (s, 10, false),
    };
    if digits.is_empty() || digits.starts_with('+') || digits.starts_with('-') {
        return Err(bad());
    }
    let cleaned: String = if prefixed {
        if digits.ends_with('_') || digits.contains("__") {
            return Err(bad());
        }
        digits.chars().filter(|c| *c != '_').collect()
    } else {
        digits.to_string()
    };
    u64::from_str_radix(&cleaned, radix).map_err(|_| bad())
}

/// klog's `-stderrthreshold`: a severity name in any case (`INFO`,
/// `WARNING`, `ERROR`, `FATAL`) or a decimal int32.
pub fn parse_klog_severity(s: &str) -> Result<String, String> {
    let named = ["INFO", "WARNING", "ERROR", "FATAL"].contains(&s.to_uppercase().as_str());
    if named || s.parse::<i32>().is_ok() {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid severity {s:?}: INFO, WARNING, ERROR, FATAL or a number"
        ))
    }
}

/// klog's `-vmodule`: comma-separated `pattern=N`, N a non-negative int32;
/// empty entries (a trailing comma) are allowed.
pub fn parse_klog_vmodule(s: &str) -> Result<String, String> {
    let syntax = || format!("invalid vmodule {s:?}: expect comma-separated list of filename=N");
    for entry in s.split(',').filter(|e| !e.is_empty()) {
        let parts: Vec<&str> = entry.split('=').collect();
        let [pattern, level] = parts[..] else {
            return Err(syntax());
        };
        if pattern.is_empty() || level.is_empty() {
            return Err(syntax());
        }
        let level: i32 = level.parse().map_err(|_| syntax())?;
        if level < 0 {
            return Err(format!("invalid vmodule {s:?}: negative level"));
        }
    }
    Ok(s.to_string())
}

/// klog's `-log_backtrace_at`: empty, or `file.go:N` with a dot in the file
/// name and N a positive integer.
pub fn parse_klog_trace_location(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Ok(String::new());
    }
    let syntax = || format!("invalid log_backtrace_at {s:?}: expect file.go:234");
    let parts: Vec<&str> = s.split(':').collect();
    let [file, line] = parts[..] else {
        return Err(syntax());
    };
    if !file.contains('.') {
        return Err(syntax());
    }
    let line: i64 = line.parse().map_err(|_| syntax())?;
    if line <= 0 {
        return Err(format!(
            "invalid log_backtrace_at {s:?}: line must be positive"
        ));
    }
    Ok(s.to_string())
}

/// klog's flags other than `-v`, `--logtostderr` and `--alsologtostderr`,
/// with klog's value checks. Accepted so that upstream's command lines
/// start; none of them changes anything here (logs go to stderr, in
/// `--log-format`). `None`: not given. The boolean ones take Go's syntax under a
/// command that applies [`go_bool_syntax`], as mic's and nmi's do.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct KlogFlags {
    /// klog: write log files in this folder (ignored: logs go to stderr).
    #[arg(long = "log_dir", hide = true)]
    pub log_dir: Option<String>,
    /// klog: write logs to this file (ignored).
    #[arg(long = "log_file", hide = true)]
    pub log_file: Option<String>,
    /// klog: largest log file, in MB (ignored).
    #[arg(long = "log_file_max_size", value_parser = parse_go_uint64, hide = true)]
    pub log_file_max_size: Option<u64>,
    /// klog: file directory in the header (ignored).
    #[arg(long = "add_dir_header", hide = true)]
    pub add_dir_header: Option<bool>,
    /// klog: no header prefixes (ignored).
    #[arg(long = "skip_headers", hide = true)]
    pub skip_headers: Option<bool>,
    /// klog: each line only at its own severity (ignored).
    #[arg(long = "one_output", hide = true)]
    pub one_output: Option<bool>,
    /// klog: no headers in log files (ignored).
    #[arg(long = "skip_log_headers", hide = true)]
    pub skip_log_headers: Option<bool>,
    /// klog: severity from which logs also go to stderr (ignored).
    #[arg(long = "stderrthreshold", value_parser = parse_klog_severity, hide = true)]
    pub stderrthreshold: Option<String>,
    /// klog: per-file verbosity, `pattern=N,...` (ignored).
    #[arg(long = "vmodule", value_parser = parse_klog_vmodule, hide = true)]
    pub vmodule: Option<String>,
    /// klog: stack trace at `file.go:N` (ignored).
    #[arg(long = "log_backtrace_at", value_parser = parse_klog_trace_location, hide = true)]
    pub log_backtrace_at: Option<String>,
}

/// The flags of [`KlogFlags`] as [`klog_without_effect`] names them, in
/// klog's order (`--logtostderr` and `-v` come between the third and the
/// fourth).
pub const KLOG_FLAG_NAMES: [&str; 10] = [
    "--log_dir",
    "--log_file",
    "--log_file_max_size",
    "--add_dir_header",
    "--skip_headers",
    "--one_output",
    "--skip_log_headers",
    "--stderrthreshold",
    "--vmodule",
    "--log_backtrace_at",
];

/// What a binary makes of klog's three common flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KlogCommon {
    /// `--logtostderr` as given (klog's default is true).
    pub logtostderr: bool,
    /// `-v` as given (0 when not).
    pub verbosity: i32,
    /// Whether this binary turns a positive `-v` into debug logs.
    pub verbosity_honoured: bool,
}

/// The klog flags on the command line that change nothing here, as
/// `--name` in klog's order. `--logtostderr=false` is named (logs still go
/// to stderr), `--logtostderr`, `--alsologtostderr` (stderr is always
/// written) never are; `-v` is named when not 0 and the binary ignores it.
pub fn klog_without_effect(k: &KlogFlags, common: KlogCommon) -> Vec<&'static str> {
    let KlogFlags {
        log_dir,
        log_file,
        log_file_max_size,
        add_dir_header,
        skip_headers,
        one_output,
        skip_log_headers,
        stderrthreshold,
        vmodule,
        log_backtrace_at,
    } = k;
    let given = [
        ("--log_dir", log_dir.is_some()),
        ("--log_file", log_file.is_some()),
        ("--log_file_max_size", log_file_max_size.is_some()),
        ("--logtostderr", !common.logtostderr),
        ("-v", common.verbosity != 0 && !common.verbosity_honoured),
        ("--add_dir_header", add_dir_header.is_some()),
        ("--skip_headers", skip_headers.is_some()),
        ("--one_output", one_output.is_some()),
        ("--skip_log_headers", skip_log_headers.is_some()),
        ("--stderrthreshold", stderrthreshold.is_some()),
        ("--vmodule", vmodule.is_some()),
        ("--log_backtrace_at", log_backtrace_at.is_some()),
    ];
    given
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect()
}

/// The one warning line for [`klog_without_effect`]'s names; `None` when
/// there are none.
pub fn klog_warning(names: &[&str]) -> Option<String> {
    (!names.is_empty()).then(|| {
        format!(
            "klog flags accepted for compatibility have no effect (logs go to stderr in --log-format): {}",
            names.join(", ")
        )
    })
}

/// How a long flag of the command takes its value, for [`go_flag_args`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagValue {
    /// A boolean or other flag whose value is only ever given with `=`.
    Attached,
    /// A flag whose value may be the next word.
    NextWord,
}

/// Go's `flag` syntax into clap's: every `-name...` whose `name` (before
/// any `=`) is a long flag of the command (`lookup` says how it takes its
/// value) becomes `--name...`. The word after a [`FlagValue::NextWord`]
/// flag given without `=` is its value and is left alone, as is everything
/// after a bare `--` and any word `lookup` does not know (clap then reports
/// it). Single-letter names are clap's short flags already.
pub fn go_flag_args(
    args: Vec<OsString>,
    lookup: &dyn Fn(&str) -> Option<FlagValue>,
) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut value_next = false;
    let mut rest = false;
    for arg in args {
        if rest || std::mem::take(&mut value_next) {
            out.push(arg);
            continue;
        }
        let Some(s) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if s == "--" {
            rest = true;
            out.push(arg);
            continue;
        }
        let (dashes, body) = if let Some(b) = s.strip_prefix("--") {
            (2, b)
        } else if let Some(b) = s.strip_prefix('-') {
            (1, b)
        } else {
            out.push(arg);
            continue;
        };
        let (name, has_value) = match body.split_once('=') {
            Some((n, _)) => (n, true),
            None => (body, false),
        };
        let kind = if name.is_empty() { None } else { lookup(name) };
        if kind == Some(FlagValue::NextWord) && !has_value {
            value_next = true;
        }
        if dashes == 1 && name.chars().count() > 1 && kind.is_some() {
            out.push(OsString::from(format!("-{s}")));
        } else {
            out.push(arg);
        }
    }
    out
}

/// [`go_flag_args`] with the long flags of a clap command.
pub fn go_flag_args_for(command: &clap::Command, args: Vec<OsString>) -> Vec<OsString> {
    let lookup = |name: &str| {
        command
            .get_arguments()
            .find(|a| {
                a.get_long() == Some(name) || a.get_short().is_some_and(|c| name == c.to_string())
            })
            .map(|a| {
                if a.get_action().takes_values() && !a.is_require_equals_set() {
                    FlagValue::NextWord
                } else {
                    FlagValue::Attached
                }
            })
    };
    go_flag_args(args, &lookup)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn go_booleans() {
        for s in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_go_bool(s), Ok(true), "{s}");
        }
        for s in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_go_bool(s), Ok(false), "{s}");
        }
        for s in ["", "yes", "no", "tRUE", "fAlse", " true", "true ", "2"] {
            assert_eq!(
                parse_go_bool(s),
                Err(format!("invalid boolean value {s:?}")),
                "{s:?}"
            );
        }
    }

    #[test]
    fn go_unsigned_integers() {
        let ok: &[(&str, u64)] = &[
            ("0", 0),
            ("1800", 1800),
            ("0x10", 16),
            ("0X1f", 31),
            ("017", 15),
            ("0o17", 15),
            ("0b101", 5),
            ("0x_1_0", 16),
            ("18446744073709551615", u64::MAX),
        ];
        for (s, want) in ok {
            assert_eq!(parse_go_uint64(s), Ok(*want), "{s}");
        }
        for s in [
            "",
            "-1",
            "+1",
            "1_0",
            "0x",
            "09",
            "0x1__0",
            "0x_",
            "abc",
            "18446744073709551616",
            " 1",
        ] {
            assert!(parse_go_uint64(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn klog_values_are_checked_as_klog_does() {
        for s in ["INFO", "warning", "Error", "FATAL", "0", "2", "-1", "+3"] {
            assert!(parse_klog_severity(s).is_ok(), "{s}");
        }
        for s in ["", "DEBUG", "1.5", "two"] {
            assert!(parse_klog_severity(s).is_err(), "{s:?}");
        }
        for s in [
            "",
            "mic=4",
            "mic=4,nmi*=2,",
            "a=0",
            ",,",
            "recordio=2,file=1,gfs*=3",
        ] {
            assert!(parse_klog_vmodule(s).is_ok(), "{s:?}");
        }
        for s in ["mic", "=4", "mic=", "mic=x", "mic=-1", "a=1=2", "mic=4,bad"] {
            assert!(parse_klog_vmodule(s).is_err(), "{s:?}");
        }
        for s in ["", "mic.go:234", "a.b:1"] {
            assert!(parse_klog_trace_location(s).is_ok(), "{s:?}");
        }
        for s in [
            "mic.go",
            "mic:12",
            "mic.go:0",
            "mic.go:-3",
            "mic.go:x",
            "a.go:1:2",
        ] {
            assert!(parse_klog_trace_location(s).is_err(), "{s:?}");
        }
    }

    #[derive(Debug, Parser)]
    #[command(mut_args = go_bool_syntax)]
    struct Cmd {
        #[command(flatten)]
        klog: KlogFlags,
        #[arg(long, default_value = "true")]
        logtostderr: bool,
        #[arg(short = 'v', long = "v", default_value_t = 0)]
        verbosity: i32,
        #[arg(long = "cloudconfig", default_value = "")]
        cloudconfig: String,
    }

    fn parse(args: &[&str]) -> Result<Cmd, clap::Error> {
        Cmd::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
    }

    const HONOURED: KlogCommon = KlogCommon {
        logtostderr: true,
        verbosity: 0,
        verbosity_honoured: true,
    };

    #[test]
    fn every_klog_flag_in_every_spelling_is_accepted() {
        let all = [
            "--log_dir=/var/log",
            "--log_file",
            "/var/log/x.log",
            "--log_file_max_size=1800",
            "--add_dir_header",
            "--skip_headers=true",
            "--one_output=false",
            "--skip_log_headers",
            "--stderrthreshold",
            "WARNING",
            "--vmodule=mic*=4,nmi=2",
            "--log_backtrace_at=mic.go:12",
        ];
        let c = parse(&all).unwrap();
        assert_eq!(
            c.klog,
            KlogFlags {
                log_dir: Some("/var/log".into()),
                log_file: Some("/var/log/x.log".into()),
                log_file_max_size: Some(1800),
                add_dir_header: Some(true),
                skip_headers: Some(true),
                one_output: Some(false),
                skip_log_headers: Some(true),
                stderrthreshold: Some("WARNING".into()),
                vmodule: Some("mic*=4,nmi=2".into()),
                log_backtrace_at: Some("mic.go:12".into()),
            }
        );
        assert_eq!(parse(&[]).unwrap().klog, KlogFlags::default());
        // klog refuses these values at start; so does this.
        for bad in [
            &["--log_file_max_size=-1"][..],
            &["--stderrthreshold=DEBUG"],
            &["--vmodule=mic"],
            &["--log_backtrace_at=mic:1"],
            &["--skip_headers=yes"],
            // A boolean never takes the next word (Go and pflag alike).
            &["--skip_headers", "false"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn flags_without_effect_are_named_in_klogs_order() {
        let k = |args: &[&str]| parse(args).unwrap().klog;
        let cases: &[(&[&str], KlogCommon, &[&str])] = &[
            (&[], HONOURED, &[]),
            (
                &["--vmodule=a=1", "--log_dir=/l"],
                HONOURED,
                &["--log_dir", "--vmodule"],
            ),
            (&["--one_output=false"], HONOURED, &["--one_output"]),
            (
                &[],
                KlogCommon {
                    logtostderr: false,
                    ..HONOURED
                },
                &["--logtostderr"],
            ),
            (
                &[],
                KlogCommon {
                    verbosity: 4,
                    ..HONOURED
                },
                &[],
            ),
            (
                &["--stderrthreshold=0"],
                KlogCommon {
                    verbosity: 4,
                    verbosity_honoured: false,
                    ..HONOURED
                },
                &["-v", "--stderrthreshold"],
            ),
            (
                &[],
                KlogCommon {
                    verbosity: 0,
                    verbosity_honoured: false,
                    ..HONOURED
                },
                &[],
            ),
        ];
        for (args, common, want) in cases {
            assert_eq!(
                klog_without_effect(&k(args), *common),
                *want,
                "{args:?} {common:?}"
            );
        }
        assert_eq!(klog_warning(&[]), None);
        assert_eq!(
            klog_warning(&["--log_dir", "-v"]).as_deref(),
            Some(
                "klog flags accepted for compatibility have no effect (logs go to stderr in --log-format): --log_dir, -v"
            )
        );
    }

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn go_flag_syntax_becomes_clap_syntax() {
        let lookup = |name: &str| match name {
            "log_dir" | "cloudconfig" | "v" => Some(FlagValue::NextWord),
            "logtostderr" => Some(FlagValue::Attached),
            _ => None,
        };
        let cases: &[(&[&str], &[&str])] = &[
            (&[], &[]),
            (&["-logtostderr"], &["--logtostderr"]),
            (&["-logtostderr=false"], &["--logtostderr=false"]),
            (&["--logtostderr"], &["--logtostderr"]),
            (
                &["-log_dir", "/l", "-v", "4"],
                &["--log_dir", "/l", "-v", "4"],
            ),
            (&["-log_dir=/l", "-v=4"], &["--log_dir=/l", "-v=4"]),
            // The value of a flag is never rewritten, even when it looks like one.
            (
                &["-cloudconfig", "-logtostderr"],
                &["--cloudconfig", "-logtostderr"],
            ),
            (
                &["-cloudconfig=-logtostderr"],
                &["--cloudconfig=-logtostderr"],
            ),
            // A boolean's next word is not its value.
            (
                &["-logtostderr", "-log_dir=/l"],
                &["--logtostderr", "--log_dir=/l"],
            ),
            // Unknown words and everything after `--` are clap's to judge.
            (&["-unknown", "-5", "x"], &["-unknown", "-5", "x"]),
            (&["--", "-logtostderr"], &["--", "-logtostderr"]),
            (&["-", "-="], &["-", "-="]),
        ];
        for (args, want) in cases {
            assert_eq!(go_flag_args(os(args), &lookup), os(want), "{args:?}");
        }
    }

    #[test]
    fn go_flag_syntax_with_a_clap_command() {
        use clap::CommandFactory;
        let args = go_flag_args_for(
            &Cmd::command(),
            os(&[
                "x",
                "-logtostderr",
                "-cloudconfig",
                "/etc/azure.json",
                "-v",
                "3",
                "-vmodule=a=1",
                "-skip_headers",
            ]),
        );
        let c = Cmd::try_parse_from(args).unwrap();
        assert!(c.logtostderr);
        assert_eq!(c.cloudconfig, "/etc/azure.json");
        assert_eq!(c.verbosity, 3);
        assert_eq!(c.klog.vmodule.as_deref(), Some("a=1"));
        assert_eq!(c.klog.skip_headers, Some(true));
    }
}
