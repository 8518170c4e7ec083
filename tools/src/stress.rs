//! Stress trials (`--stress` or `SPORKLE_STRESS=1`; otherwise listed as ignored): several
//! threads submit random mixes of `suites/stress.toml` to one shared device for
//! `SPORKLE_STRESS_SECS` seconds (default 10), with weights changing between calls; every
//! `CHECK_EVERY`-th result (and each thread's first) is checked against the reference. Any mismatch, error, or a watchdog
//! timeout (no job finishing for `WATCHDOG` seconds) fails the trial. A progress bar shows on a
//! terminal; a summary line follows (jobs, verified, mismatches, throughput, peak memory).

use super::{named, Context, Device};
use libtest_mimic::{Failed, Trial};
use sporkle::suite::Case;
use sporkle::tolerance::{compare, Tolerance};
use sporkle::{data, reference};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Submitting threads.
const THREADS: usize = 4;
/// Every this many jobs of a thread (and its first), the result is compared with the reference.
const CHECK_EVERY: u64 = 3;
/// Seconds without any finished job before the run counts as hung.
const WATCHDOG: u64 = 60;

pub fn trials(ctx: &Arc<Context>) -> sporkle::Result<Vec<Trial>> {
    let cases = Arc::new(super::suites::load("stress")?.cases);
    let stress = ctx.opts.stress;
    Ok(ctx
        .devices
        .iter()
        .filter(|d| d.is_backend())
        .map(|device| {
            let (dev, cases) = (device.clone(), Arc::clone(&cases));
            Trial::test(named(device.kind(), "stress-run/mixed"), move || {
                run(&dev, &cases)
            })
            .with_ignored_flag(!stress)
        })
        .collect())
}

#[derive(Default)]
struct Counters {
    jobs: AtomicU64,
    verified: AtomicU64,
    flops: AtomicU64,
    mismatches: AtomicU64,
    stop: AtomicBool,
}

fn run(device: &Device, cases: &Arc<Vec<Case>>) -> Result<(), Failed> {
    let secs: u64 = match std::env::var("SPORKLE_STRESS_SECS") {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("SPORKLE_STRESS_SECS={v:?} is not a number of seconds"))?,
        Err(_) => 10,
    };
    let counters = Arc::new(Counters::default());
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let workers: Vec<_> = (0..THREADS as u64)
        .map(|t| {
            let (device, cases, counters, first_error) = (
                device.clone(),
                Arc::clone(cases),
                Arc::clone(&counters),
                Arc::clone(&first_error),
            );
            std::thread::spawn(move || {
                worker(t, &device, &cases, &counters, &first_error, deadline)
            })
        })
        .collect();
    // One bar per trial, named by its device, under one MultiProgress for the process, so
    // stress trials that run at once each keep their own line.
    let bars = bars();
    let bar = bars.add(indicatif::ProgressBar::new(secs));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "stress {prefix:>14} [{bar:30}] {pos}/{len} s {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(format!("[{}]", device.kind()));
    let mut last_jobs = 0;
    let mut last_progress = Instant::now();
    let mut hung = false;
    while workers.iter().any(|w| !w.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        let jobs = counters.jobs.load(Relaxed);
        if jobs != last_jobs {
            (last_jobs, last_progress) = (jobs, Instant::now());
        } else if last_progress.elapsed() > Duration::from_secs(WATCHDOG) {
            hung = true;
            counters.stop.store(true, Relaxed);
            break;
        }
        bar.set_position(start.elapsed().as_secs().min(secs));
        bar.set_message(format!(
            "{jobs} jobs, {} verified",
            counters.verified.load(Relaxed)
        ));
    }
    bar.finish_and_clear();
    bars.remove(&bar);
    let elapsed = start.elapsed().as_secs_f64();
    let (jobs, verified, mismatches) = (
        counters.jobs.load(Relaxed),
        counters.verified.load(Relaxed),
        counters.mismatches.load(Relaxed),
    );
    // Through the bars, so the line is not drawn over. Memory is the process's: the stress
    // trials that run at once share it, and the line says so.
    let line = format!(
        "stress [{}]: {jobs} jobs on {THREADS} threads in {elapsed:.1} s, {verified} verified, {mismatches} mismatches, {:.2} GFLOP/s; the process's peak resident memory so far (every trial running at once): {}",
        device.kind(),
        counters.flops.load(Relaxed) as f64 / elapsed / 1e9,
        peak_memory()
    );
    if bars.println(&line).is_err() || bars.is_hidden() {
        eprintln!("{line}");
    }
    if hung {
        return Err(format!("watchdog: no job finished for {WATCHDOG} s (hang)").into());
    }
    for w in workers {
        w.join().map_err(|_| "a stress thread panicked")?;
    }
    if let Some(e) = first_error.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(e.into());
    }
    if jobs == 0 || verified == 0 {
        return Err("the stress run finished no verified job".into());
    }
    Ok(())
}

fn worker(
    t: u64,
    device: &Device,
    cases: &[Case],
    c: &Counters,
    first_error: &Mutex<Option<String>>,
    deadline: Instant,
) {
    let mut rng = data::SplitMix64::new(0x5EED ^ t);
    let mut n = 0u64;
    while Instant::now() < deadline && !c.stop.load(Relaxed) {
        let case = &cases[rng.below(cases.len() as u64) as usize];
        // New data (weights included) on every call: a stale weight cache would show.
        let seed = rng.next_u64();
        let p = &case.params;
        let (x, w, b) = data::conv_data(p, seed, case.exact);
        let bias = case.bias.then_some(&b[..]);
        let result = device.conv2d(p, &x, &w, bias);
        n += 1;
        let problem = match result {
            Err(e) => Some(format!("{}: error: {e}", case.name)),
            // Each thread's first job too: a short run on a loaded machine (a thread finishing
            // fewer than CHECK_EVERY jobs) still verifies something on every thread.
            Ok(y) if n == 1 || n.is_multiple_of(CHECK_EVERY) => {
                c.verified.fetch_add(1, Relaxed);
                let tol = if case.exact {
                    Tolerance::Exact
                } else {
                    Tolerance::for_params(p)
                };
                match reference::conv2d_f64(p, &x, &w, bias) {
                    Ok(r) => compare(p, &y, &r, tol)
                        .err()
                        .map(|m| format!("{} (seed {seed}): {m}", case.name)),
                    Err(e) => Some(format!("{}: reference: {e}", case.name)),
                }
            }
            Ok(_) => None,
        };
        c.jobs.fetch_add(1, Relaxed);
        c.flops.fetch_add(p.flops(), Relaxed);
        if let Some(problem) = problem {
            c.mismatches.fetch_add(1, Relaxed);
            first_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(problem);
        }
    }
}

/// The progress bars of the stress trials running in this process (drawn on stderr).
fn bars() -> &'static indicatif::MultiProgress {
    static BARS: std::sync::OnceLock<indicatif::MultiProgress> = std::sync::OnceLock::new();
    BARS.get_or_init(indicatif::MultiProgress::new)
}

/// Peak resident memory of this process (Linux `VmHWM`), or "unknown".
fn peak_memory() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l[6..].trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}
