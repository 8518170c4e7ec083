//! The validation harness: the product's proof, as a libtest-mimic runner, in a crate of its
//! own (`sporkle-tools`) so that its crates stay out of the library's users' builds.
//!
//! The trials are defined here, once; `sporkle-validate` (src/bin) and `cargo test`'s
//! `tests/validate.rs` (`harness = false`) both call [`main`]. Every trial runs per device and
//! carries the device as its kind, so `[cpu]`-style filters select a device:
//!
//! | trials | what they prove |
//! | --- | --- |
//! | `{basic,edge,regression,stress}/{case}` | each suite case (`suites/*.toml`) against the reference, in tolerance or bit-exact |
//! | `props/random_vs_reference` | proptest: random shapes and parameters against the reference; failures persist in `suites/props.proptest-regressions` |
//! | `golden/{case}` | outputs of an independent producer (onnxruntime, `golden/make_golden.py`); the reference runs these too |
//! | `fingerprint/{case}` | insta snapshots of each device's exact output bits: numerics that move show up as a diff |
//! | `leak/create_run_drop` | dhat, in a child process (`sporkle-leak-child`): heap back to its baseline after create/run/drop cycles |
//! | `stress-run/mixed` | many threads, mixed shapes, changing weights, sampled checks, a watchdog (`--stress`) |
//! | `perf/{case}` | benchmarks against stored baselines, as ratios to a calibration of the same run (`--bench`) |
//! | `tidy/conventions` | every file opens with `//!`; `unsafe` only where allowed, each block with `// SAFETY:` |
//!
//! Devices (kinds): `reference` (the oracle: golden trials only), `cpu` (the CPU backend as it
//! runs by default), `cpu-portable` (the CPU backend with the portable microkernel, where the
//! default one is SIMD). GPU kinds join when their backends exist.
//!
//! Beyond libtest's options: `--stress` (or `SPORKLE_STRESS=1`) runs the stress trials,
//! `--report DIR` writes the performance report, `--peers FILE` (repeatable) adds peers' JSON
//! lines to it, `--problem DESC` (repeatable) runs only the cases given as benchdnn problem
//! descriptors (`problem/{name}`, see [`sporkle::desc`]). `SPORKLE_BLESS=1` rewrites goldens' fingerprints and performance baselines.

#![forbid(unsafe_code)]

mod devices;
mod golden;
mod juggling;
pub mod leaks;
mod perf;
pub mod props;
mod stress;
mod suites;
mod tidy;

pub use devices::Device;

use libtest_mimic::{Arguments, Failed, Trial};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

/// Options of `sporkle-validate` beyond libtest's.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Run the stress trials.
    pub stress: bool,
    /// Write the performance report here.
    pub report: Option<PathBuf>,
    /// Peers' JSON lines for the report.
    pub peers: Vec<PathBuf>,
    /// Rewrite fingerprints and baselines (`SPORKLE_BLESS=1`).
    pub bless: bool,
    /// Measure the performance trials (`--bench`); only they run.
    pub bench: bool,
    /// Cases given as benchdnn problem descriptors (`--problem DESC`, repeatable); when there
    /// are any, only they run (`problem/{name}` on every backend, against the reference).
    pub problems: Vec<sporkle::suite::Case>,
}

impl Options {
    /// Takes sporkle's own options out of `args` (libtest's parser rejects unknown ones) and
    /// reads the environment knobs.
    fn take_from(args: &mut Vec<String>) -> Result<Self, String> {
        let env_on = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty() && v != "0");
        let mut o = Options {
            stress: env_on("SPORKLE_STRESS"),
            bless: env_on("SPORKLE_BLESS"),
            ..Self::default()
        };
        let mut rest = Vec::with_capacity(args.len());
        let mut it = std::mem::take(args).into_iter();
        while let Some(a) = it.next() {
            let mut value = |flag: &str| it.next().ok_or_else(|| format!("{flag} needs a value"));
            match a.as_str() {
                "--stress" => o.stress = true,
                "--report" => o.report = Some(value("--report")?.into()),
                "--peers" => o.peers.push(value("--peers")?.into()),
                "--problem" => o.problems.push(problem(&value("--problem")?)?),
                _ => match a.split_once('=') {
                    Some(("--report", v)) => o.report = Some(v.into()),
                    Some(("--peers", v)) => o.peers.push(v.into()),
                    Some(("--problem", v)) => o.problems.push(problem(v)?),
                    _ => rest.push(a),
                },
            }
        }
        *args = rest;
        Ok(o)
    }
}

/// A `--problem` case, or why its descriptor cannot run.
fn problem(desc: &str) -> Result<sporkle::suite::Case, String> {
    sporkle::suite::Case::from_desc(desc).map_err(|e| format!("--problem: {e}"))
}

/// What every trial shares.
pub struct Context {
    /// The options.
    pub opts: Options,
    /// The devices of this machine.
    pub devices: Vec<Device>,
    /// Why there is no `[gpu]` device (`None` when there is one).
    gpu_absence: Option<String>,
    /// Performance results of this run, for the report.
    perf_rows: Mutex<Vec<perf::Row>>,
}

/// Runs the harness with the process's command line; returns its exit code.
pub fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    if args.iter().skip(1).any(|a| a == "-h" || a == "--help") {
        print!("{HELP}");
        return ExitCode::SUCCESS;
    }
    let opts = match Options::take_from(&mut args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sporkle-validate: {e}");
            return ExitCode::from(2);
        }
    };
    // libtest-mimic takes one filter; several select the trials matching any of them (as
    // libtest's do), applied here.
    let filters = take_filters(&mut args);
    let mut targs = Arguments::from_iter(args);
    if filters.len() == 1 {
        targs.filter = filters.first().cloned();
    }
    let mut opts = opts;
    if targs.bench {
        // sporkle handles --bench itself: performance trials are ordinary tests that measure in
        // this mode (so `--list` prints only ": test" lines, as cargo-nextest expects), and
        // timings need the machine to themselves.
        (opts.bench, targs.bench, targs.test_threads) = (true, false, Some(1));
    }
    prepare_insta(opts.bless);
    let (devices, gpu_absence) = Device::all();
    let ctx = Arc::new(Context {
        opts,
        devices,
        gpu_absence,
        perf_rows: Mutex::default(),
    });
    let mut trials = match all_trials(&ctx) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("sporkle-validate: {e}");
            return ExitCode::FAILURE;
        }
    };
    if filters.len() > 1 {
        let before = trials.len();
        trials.retain(|t| {
            filters.iter().any(|f| match targs.exact {
                true => t.name() == f,
                false => t.name().contains(f.as_str()),
            })
        });
        eprintln!(
            "sporkle-validate: {} of {before} trials match any of {filters:?}",
            trials.len()
        );
    }
    let conclusion = libtest_mimic::run(&targs, trials);
    if let Some(dir) = &ctx.opts.report {
        if let Err(e) = perf::write_report(&ctx, dir) {
            eprintln!("sporkle-validate: report: {e}");
            return ExitCode::FAILURE;
        }
    }
    conclusion.exit_code()
}

/// `sporkle-validate --help`.
const HELP: &str = "\
sporkle-validate: the validation harness of sporkle (the same trials `cargo test` runs).
Every trial runs per device and is named `[device] family/case`.

Usage: sporkle-validate [OPTIONS] [FILTER ...]

Filters: a trial runs if its name contains any FILTER (with --exact: equals one), e.g.
  sporkle-validate '[cpu]'                  every trial of the CPU backend
  sporkle-validate '[cpu] edge/'            the CPU's edge cases
  sporkle-validate fingerprint/ golden/     both families, every device

sporkle's options:
  --stress            also run the stress trials (same as SPORKLE_STRESS=1)
  --bench             run only the performance trials, measured against golden/perf baselines
  --report DIR        write perf.json and perf.svg there (with --bench)
  --peers FILE        peers' JSON lines (shared/peers/*.py) for the report; repeatable
  --problem DESC      run only this benchmark problem descriptor (benchdnn's notation, e.g.
                      mb32ic64ih56oc64kh3ph1) on every device; repeatable
  -h, --help          this text

libtest's options (libtest-mimic):
  --list              list the trials          --exact             filters match whole names
  --ignored           run only ignored trials  --include-ignored   run ignored trials too
  --skip FILTER       skip matching trials     --test-threads N    trials at once
  --format pretty|terse|json                   --color auto|always|never
  -q, --quiet         one character per trial  --logfile PATH

Environment:
  SPORKLE_BLESS=1           write new fingerprints (and, with --bench, baselines) instead of failing
  CI                        set: nothing under golden/ is written; a missing or changed one fails
  SPORKLE_STRESS=1          run the stress trials;  SPORKLE_STRESS_SECS=N  each one's length (10)
  SPORKLE_REQUIRE_GPU=1     fail gpu/available unless there is a hardware GPU
  SPORKLE_GPU=off|auto|software|N          which EGL device is the GPU
  SPORKLE_GPU_TILE=kernel:BMxBNxBK:TMxTN[:SPLIT]   force a GPU tile (tuning)
  SPORKLE_GPU_ALGO=direct|winograd         force the GPU's algorithm where Winograd applies
  SPORKLE_STREAM_COPY=cuda|shader[:N]|dma  how the executor copies;  SPORKLE_STREAM_PARTS=N
  (README.md lists every knob.)

Accept new numerics: SPORKLE_BLESS=1 cargo run --release --bin sporkle-validate -- fingerprint
Review them first:   cargo install cargo-insta; cargo insta review
";

/// Takes the positional filters out of `args` (the arguments that are neither options nor the
/// values of libtest's options that take one).
fn take_filters(args: &mut Vec<String>) -> Vec<String> {
    const WITH_VALUE: [&str; 6] = [
        "--test-threads",
        "--logfile",
        "--skip",
        "--color",
        "--format",
        "-Z",
    ];
    let mut filters = Vec::new();
    let mut rest = Vec::with_capacity(args.len());
    let mut it = std::mem::take(args).into_iter();
    if let Some(program) = it.next() {
        rest.push(program);
    }
    while let Some(a) = it.next() {
        if WITH_VALUE.contains(&a.as_str()) {
            rest.push(a);
            rest.extend(it.next());
        } else if a.starts_with('-') {
            rest.push(a);
        } else {
            filters.push(a);
        }
    }
    *args = rest;
    filters
}

/// Every trial, for every device.
fn all_trials(ctx: &Arc<Context>) -> sporkle::Result<Vec<Trial>> {
    if ctx.opts.bench {
        return perf::trials(ctx);
    }
    if !ctx.opts.problems.is_empty() {
        return Ok(suites::problem_trials(ctx));
    }
    let mut trials = suites::trials(ctx)?;
    trials.extend(props::trials(ctx));
    trials.extend(golden::trials(ctx)?);
    trials.extend(leaks::trials(ctx));
    trials.extend(juggling::trials(ctx));
    trials.extend(stress::trials(ctx)?);
    trials.extend(perf::trials(ctx)?);
    trials.extend(tidy::trials());
    trials.push(gpu_presence(ctx));
    Ok(trials)
}

/// `gpu/available`: passes when there is a GPU (a hardware one, with `SPORKLE_REQUIRE_GPU=1`);
/// otherwise it is ignored with the reason, so a machine without GPU trials says so.
fn gpu_presence(ctx: &Context) -> Trial {
    let absent = ctx.gpu_absence.clone();
    let software = ctx.devices.iter().any(|d| d.is_software());
    let require = std::env::var("SPORKLE_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let missing = match (&absent, require) {
        (Some(why), false) => Some(format!("no GPU, so no [gpu] trials: {why}")),
        _ => None,
    };
    let reason = missing.clone();
    let trial = Trial::ignorable_test(named("gpu", "gpu/available"), move || {
        match (absent, require) {
            (Some(why), true) => {
                Err(format!("SPORKLE_REQUIRE_GPU=1, but there is no GPU: {why}").into())
            }
            (Some(_), false) => Ok(libtest_mimic::Completion::ignored_with(
                reason.unwrap_or_default(),
            )),
            (None, true) if software => {
                Err("SPORKLE_REQUIRE_GPU=1, but the only GPU is a software renderer".into())
            }
            (None, _) => Ok(libtest_mimic::Completion::Completed),
        }
    });
    unless_missing(trial, missing)
}

/// insta writes into `golden/snapshots`; blessing means accepting every new value, and
/// clearing what earlier failed runs left pending (`*.snap.new`), so nothing stray is committed.
fn prepare_insta(bless: bool) {
    // Edition 2021: set_var is safe; this runs before any trial thread starts.
    if bless {
        std::env::set_var("INSTA_UPDATE", "always");
        clear_pending(&sporkle::repo_root().join("golden/snapshots"));
    } else {
        // A new fingerprint is written as `.snap.new` and the trial fails with sporkle's own
        // message (golden.rs), not with insta's panic, backtrace and advice for cargo-insta's
        // runner.
        std::env::set_var("INSTA_FORCE_PASS", "1");
    }
    if std::env::var_os("INSTA_WORKSPACE_ROOT").is_none() {
        std::env::set_var("INSTA_WORKSPACE_ROOT", sporkle::repo_root());
    }
}

/// Removes the `*.snap.new` files in `dir` (pending fingerprints of earlier failed runs).
fn clear_pending(dir: &std::path::Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.to_str().is_some_and(|p| p.ends_with(".snap.new")) {
            if let Err(e) = std::fs::remove_file(&path) {
                eprintln!("sporkle-validate: cannot remove {}: {e}", path.display());
            }
        }
    }
}

/// A trial of `device` that is expected to fail there when `xfail` gives a reason: then a
/// failure passes (and says so) and a pass fails, so a fixed bug cannot hide.
pub(crate) fn trial(
    name: String,
    device: &Device,
    xfail: Option<String>,
    body: impl FnOnce() -> Result<(), Failed> + Send + 'static,
) -> Trial {
    Trial::test(named(device.kind(), name), move || {
        judge_xfail(body(), xfail.as_deref())
    })
}

/// The outcome of a trial given its result and its expected-failure reason, if any.
fn judge_xfail(result: Result<(), Failed>, xfail: Option<&str>) -> Result<(), Failed> {
    match (result, xfail) {
        (result, None) => result,
        (Ok(()), Some(reason)) => Err(format!(
            "unexpected pass: this case is marked to fail here ({reason}); remove the xfail"
        )
        .into()),
        (Err(e), Some(reason)) => {
            eprintln!("expected failure ({reason}): {}", e.message().unwrap_or(""));
            Ok(())
        }
    }
}

/// `trial`, marked ignored before anything runs where its precondition is `missing` (the
/// reason is said once on stderr), so that every runner skips it: libtest's, this one's, and
/// cargo-nextest, which learns which trials are ignored from `--list --ignored` and counts a
/// trial that runs and returns as passed. Run anyway (`--include-ignored`), its body reports
/// the same reason as ignored.
pub(crate) fn unless_missing(trial: Trial, missing: Option<String>) -> Trial {
    match missing {
        Some(why) => {
            eprintln!("sporkle-validate: {} is ignored: {why}", trial.name());
            trial.with_ignored_flag(true)
        }
        None => trial,
    }
}

/// A trial's name: `[kind] name`. The kind is written into the name rather than given to
/// libtest-mimic as its kind, so that every report names the device: the text summary of
/// failures and `--format json`'s lines carry the name alone, where 4 devices' trials would
/// otherwise share one name. Filters still select a device (`'[cpu]'`, `'[cpu] edge/'`).
pub(crate) fn named(kind: &str, name: impl std::fmt::Display) -> String {
    format!("[{kind}] {name}")
}

/// Turns any displayable error into a trial failure.
pub(crate) fn fail(e: impl std::fmt::Display) -> Failed {
    Failed::from(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An xfail trial passes when it fails and fails when it passes (a fixed bug cannot hide).
    #[test]
    fn expected_failures_and_unexpected_passes() {
        assert!(judge_xfail(Err("wrong".into()), Some("known bug")).is_ok());
        let e = judge_xfail(Ok(()), Some("known bug")).unwrap_err();
        assert!(e.message().unwrap().contains("unexpected pass"));
        assert!(judge_xfail(Ok(()), None).is_ok());
        assert!(judge_xfail(Err("wrong".into()), None).is_err());
    }

    /// Blessing clears what failed runs left pending, and only that.
    #[test]
    fn blessing_clears_pending_fingerprints() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["a@k.snap", "a@k.snap.new", "b@j.snap.new", "notes.txt"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        clear_pending(dir.path());
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["a@k.snap", "notes.txt"]);
    }

    #[test]
    fn several_filters_are_taken_out_of_the_command_line() {
        let mut args: Vec<String> = [
            "bin", "[cpu]", "--skip", "leak", "edge/", "--exact", "--format", "json",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(take_filters(&mut args), ["[cpu]", "edge/"]);
        assert_eq!(
            args,
            ["bin", "--skip", "leak", "--exact", "--format", "json"]
        );
    }

    #[test]
    fn own_options_are_taken_out_of_the_command_line() {
        let mut args: Vec<String> = [
            "bin",
            "--stress",
            "--report",
            "out",
            "--peers=a.json",
            "edge",
            "--exact",
        ]
        .map(String::from)
        .to_vec();
        let o = Options::take_from(&mut args).unwrap();
        assert!(o.stress);
        assert!(o.problems.is_empty());
        assert_eq!(o.report, Some(PathBuf::from("out")));
        assert_eq!(o.peers, vec![PathBuf::from("a.json")]);
        assert_eq!(args, ["bin", "edge", "--exact"]);
        assert!(Options::take_from(&mut vec!["bin".into(), "--report".into()]).is_err());
        let mut args: Vec<String> = [
            "bin",
            "--problem",
            "mb1ic4ih5oc8kh3",
            "--problem=ic4ih5oc4kh1n\"x\"",
        ]
        .map(String::from)
        .to_vec();
        let o = Options::take_from(&mut args).unwrap();
        let names: Vec<&str> = o.problems.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["mb1ic4ih5oc8kh3", "x"]);
        assert_eq!(args, ["bin"]);
        let bad = Options::take_from(&mut vec!["bin".into(), "--problem=ic4ih5oc4".into()]);
        assert!(bad.unwrap_err().contains("kernel size"));
    }
}
