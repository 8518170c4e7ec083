//! Leak trials: heap in use must return to its baseline after many create/run/drop cycles of
//! each backend, and no GL object may outlive its backend.
//!
//! dhat allows one profiler per process, so each leak trial re-runs this same binary as a
//! child with `SPORKLE_LEAK_CHILD=<device kind>`; [`run_child_if_asked`] (first thing in
//! [`super::main`]) then profiles the cycles and reports one line. The binaries that host the
//! harness declare `dhat::Alloc` as their global allocator (it forwards to the system allocator
//! when no profiler runs); the child checks that it does before trusting any number.

use super::{Context, Device};
use libtest_mimic::Trial;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Environment variable that turns the runner into a leak-check child.
pub const CHILD_ENV: &str = "SPORKLE_LEAK_CHILD";
/// Create/run/drop cycles measured after warm-up.
const CYCLES: usize = 25;
/// Cases each cycle runs: one per code path (GEMM rows and strips, direct, row tiles).
const CASES: [(&str, &str); 4] = [
    ("basic", "conv3x3_pad1"),
    ("basic", "pointwise_1x1"),
    ("basic", "depthwise3x3"),
    ("edge", "width_past_16"),
];

pub fn trials(ctx: &Arc<Context>) -> Vec<Trial> {
    ctx.devices
        .iter()
        .filter(|d| d.is_backend())
        .map(|device| {
            let kind = device.kind();
            Trial::test("leak/create_run_drop", move || {
                let exe = std::env::current_exe().map_err(super::fail)?;
                let out = Command::new(exe)
                    .env(CHILD_ENV, kind)
                    .output()
                    .map_err(super::fail)?;
                let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                if out.status.success() {
                    println!("{said}");
                    Ok(())
                } else {
                    Err(format!("{said} {err}").trim().to_owned().into())
                }
            })
            .with_kind(kind)
        })
        .collect()
}

/// In a leak-check child, runs the check and returns the exit code; otherwise `None`.
pub fn run_child_if_asked() -> Option<ExitCode> {
    let kind = std::env::var(CHILD_ENV).ok()?;
    let _profiler = dhat::Profiler::builder().testing().build();
    let result = child(&kind);
    let code = if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    println!("{}", result.unwrap_or_else(|e| e));
    Some(code)
}

/// Heap in use, after asking crossbeam-epoch (which rayon's work-stealing deques use) to free
/// the garbage it defers: those frees happen at times of the collector's choosing, bounded but
/// not deterministic, and would blur the measurement.
fn heap() -> usize {
    for _ in 0..64 {
        crossbeam_epoch::pin().flush();
    }
    dhat::HeapStats::get().curr_bytes
}

fn child(kind: &str) -> Result<String, String> {
    let probe_before = heap();
    let probe = std::hint::black_box(vec![1u8; 1 << 16]);
    let probe_during = heap();
    drop(probe);
    if probe_during < probe_before + (1 << 16) {
        return Err(
            "leak check cannot run: this binary's global allocator is not dhat::Alloc".into(),
        );
    }
    let (devices, _) = Device::all();
    let template = devices
        .iter()
        .find(|d| d.kind() == kind)
        .ok_or_else(|| format!("no device {kind} here"))?;
    let mut cases = Vec::new();
    for (suite, name) in CASES {
        let s = super::suites::load(suite).map_err(|e| e.to_string())?;
        cases.push(
            s.cases
                .into_iter()
                .find(|c| c.name == name)
                .ok_or_else(|| format!("no case {suite}/{name}"))?,
        );
    }
    let cycle = || -> Result<(), String> {
        let device = template.fresh().map_err(|e| e.to_string())?;
        for case in &cases {
            super::suites::check_case(case, &device)
                .map_err(|e| e.message().unwrap_or("").to_owned())?;
        }
        Ok(())
    };
    // Warm-up: one-time lazies (CPU feature detection, the suites' first parse) settle here.
    cycle()?;
    cycle()?;
    let base = heap();
    for _ in 0..CYCLES {
        cycle()?;
    }
    // A dropped backend's threads have exited (its Drop waits), but give the allocator's view a
    // moment to settle before calling anything a leak.
    let deadline = Instant::now() + Duration::from_secs(2);
    while heap() > base && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let after = heap();
    let live = crate::gpu::LiveObjects::now();
    if !live.is_zero() {
        return Err(format!(
            "GL objects still alive after every backend was dropped: {live:?}"
        ));
    }
    if after > base {
        return Err(format!(
            "heap in use grew from {base} to {after} bytes over {CYCLES} create/run/drop cycles of [{kind}] ({} bytes per cycle)",
            (after - base) / CYCLES
        ));
    }
    Ok(format!("heap in use {base} bytes before and {after} after {CYCLES} create/run/drop cycles of [{kind}]"))
}
