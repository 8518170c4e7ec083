//! Leak trials: heap in use must return to its baseline after many create/run/drop cycles of
//! each backend, and no GL object may outlive its backend; a warm synchronous GPU call must
//! allocate nothing the size of its data.
//!
//! dhat allows one profiler per process, and its allocator serialises every allocation behind
//! a lock, so the runner does not use it: each leak trial runs the `sporkle-leak-child` binary
//! (the only one whose global allocator is `dhat::Alloc`) with its mode as the argument;
//! [`child_main`] profiles the cycles and prints one line. The child checks that dhat is its
//! allocator before trusting any number.

use super::{named, Context, Device};
use libtest_mimic::Trial;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The leak child's binary name (`tools/src/bin/sporkle-leak-child.rs`).
pub const CHILD_BIN: &str = "sporkle-leak-child";
/// Where the host binary says the leak child is (see [`set_child_exe`]).
static CHILD_EXE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Tells the runner where the leak child binary is (`cargo test`'s target passes cargo's path
/// of it); otherwise it is looked for beside the running binary.
pub fn set_child_exe(path: impl Into<std::path::PathBuf>) {
    let _ = CHILD_EXE.set(path.into());
}

/// The leak child binary: the one set, or the one beside this binary.
fn child_exe() -> Result<std::path::PathBuf, String> {
    if let Some(p) = CHILD_EXE.get() {
        return Ok(p.clone());
    }
    let me = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let exe = me.with_file_name(format!("{CHILD_BIN}{}", std::env::consts::EXE_SUFFIX));
    if exe.is_file() {
        Ok(exe)
    } else {
        Err(format!(
            "leak check cannot run: its child binary {} is missing (build every binary: \
             `cargo build --release --bins`)",
            exe.display()
        ))
    }
}
/// Create/run/drop cycles measured after warm-up.
const CYCLES: usize = 25;
/// Cases each cycle runs: one per code path (GEMM rows and strips, direct, row tiles).
const CASES: [(&str, &str); 4] = [
    ("basic", "conv3x3_pad1"),
    ("basic", "pointwise_1x1"),
    ("basic", "depthwise3x3"),
    ("edge", "width_past_16"),
];

/// Heap growth tolerated over a window of create/run/drop cycles (the heap, settled, grows by
/// 0-32 bytes a window here, in steps: some registry's capacity); a leak of even the smallest
/// allocation (8 bytes) per cycle grows 200 bytes a window and fails (planted: it did, on
/// every device kind).
const RUN_DROP_SLACK: usize = 64;
/// Submit/wait cycles of the streaming leak trial.
const STREAM_CYCLES: usize = 1000;
/// Heap growth tolerated between the streaming leak trial's windows (see `stream_child`).
const STREAM_SLACK: usize = 2560;
/// The child mode of the streaming leak trial, after the device kind.
const STREAM_MODE: &str = "+stream";
/// The child mode of the warm-call trial, after the device kind.
const CALL_MODE: &str = "+call";
/// Warm synchronous calls the warm-call trial counts allocations over.
const WARM_CALLS: usize = 10;

/// Runs the leak child with `mode` and reports its line.
fn run_child(mode: String) -> Result<(), libtest_mimic::Failed> {
    let exe = child_exe()?;
    let out = Command::new(&exe)
        .arg(mode)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if out.status.success() {
        eprintln!("{said}");
        Ok(())
    } else {
        Err(format!("{said} {err}").trim().to_owned().into())
    }
}

pub fn trials(ctx: &Arc<Context>) -> Vec<Trial> {
    let mut out: Vec<Trial> = ctx
        .devices
        .iter()
        .filter(|d| d.is_backend())
        .map(|device| {
            let kind = device.kind();
            Trial::test(named(kind, "leak/create_run_drop"), move || {
                run_child(kind.to_owned())
            })
        })
        .collect();
    for device in ctx.devices.iter().filter(|d| d.juggler().is_some()) {
        let kind = device.kind();
        out.push(Trial::test(
            named(kind, format!("leak/submit_wait_{STREAM_CYCLES}")),
            move || run_child(format!("{kind}{STREAM_MODE}")),
        ));
    }
    // A Juggler that prefers the GPU: its synchronous calls go through the staged path.
    for device in (ctx.devices.iter()).filter(|d| matches!(d, Device::GpuAsync { .. })) {
        let kind = device.kind();
        out.push(Trial::test(
            named(kind, "leak/warm_call_allocates_no_data"),
            move || run_child(format!("{kind}{CALL_MODE}")),
        ));
    }
    out
}

/// A Juggler that prefers the GPU, warm: [`WARM_CALLS`] synchronous `conv2d` calls (input and
/// output 1 MiB each) allocate, all together, less than one input: no call copies its
/// input, weights or output into memory of its own. Every call ran on the GPU; the last output
/// is checked against the reference.
fn call_child(kind: &str) -> Result<String, String> {
    let (devices, _) = Device::all();
    let device = (devices.iter())
        .find(|d| d.kind() == kind)
        .ok_or_else(|| format!("no device {kind} here"))?;
    let juggler = device.juggler().ok_or("not a Juggler device")?;
    let p = sporkle::Conv2dParams::new(1, 64, 64, 64, 64, 1, 1);
    let (x, w, b) = sporkle::data::conv_data(&p, 7, false);
    let mut y = vec![0.0f32; p.output_len()];
    let call = |y: &mut [f32]| -> Result<(), String> {
        let info = (juggler.conv2d(&p, &x, &w, Some(&b), y)).map_err(|e| e.to_string())?;
        match (info.device, &info.fallback) {
            (sporkle::juggler::DeviceKind::Gpu, None) => Ok(()),
            (d, why) => Err(format!("a call ran on the {d}: {why:?} {}", info.reason)),
        }
    };
    // Warm: the program, resident weights, staging and the pooled input exist after these.
    for _ in 0..3 {
        call(&mut y)?;
    }
    let before = dhat::HeapStats::get();
    for _ in 0..WARM_CALLS {
        call(&mut y)?;
    }
    let after = dhat::HeapStats::get();
    let (bytes, blocks) = (
        after.total_bytes - before.total_bytes,
        after.total_blocks - before.total_blocks,
    );
    let data = (p.input_len().min(p.output_len()) * 4) as u64;
    if bytes >= data {
        return Err(format!(
            "{WARM_CALLS} warm synchronous GPU calls allocated {bytes} bytes in {blocks} blocks, \
             where an input or output is {data} bytes: some call copies its data into memory \
             of its own"
        ));
    }
    let tol = sporkle::tolerance::Tolerance::for_params(&p);
    sporkle::tolerance::check_sample(&p, &x, &w, Some(&b), &y, 256, tol)
        .map_err(|m| m.to_string())?;
    Ok(format!(
        "[{kind}] {WARM_CALLS} warm synchronous GPU calls allocated {bytes} bytes in {blocks} \
         blocks in all (an input or output is {data} bytes)"
    ))
}

/// The leak child's `main` (its binary declares `dhat::Alloc` as the global allocator): runs
/// the check its one argument names (a device kind, then `+stream` or `+call` or nothing) and
/// prints its line; the exit code says whether it passed.
pub fn child_main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode] = args.as_slice() else {
        eprintln!("{CHILD_BIN}: one argument, the check (run by sporkle-validate's leak trials)");
        return ExitCode::from(2);
    };
    let _profiler = dhat::Profiler::builder().testing().build();
    let result = child(mode);
    let code = if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    println!("{}", result.unwrap_or_else(|e| e));
    code
}

/// Fails unless dhat is this binary's global allocator (else every number would be zero).
fn check_profiler() -> Result<(), String> {
    let probe_before = heap();
    let probe = std::hint::black_box(vec![1u8; 1 << 16]);
    let probe_during = heap();
    drop(probe);
    if probe_during < probe_before + (1 << 16) {
        return Err(
            "leak check cannot run: this binary's global allocator is not dhat::Alloc".into(),
        );
    }
    Ok(())
}

/// One Juggler of device `kind`, [`STREAM_CYCLES`] submit/wait cycles over a few shapes: heap
/// and GL objects flat from the first tenth of the cycles to the end, and zero GL objects after
/// drop with the heap back to where it was before the Juggler.
fn stream_child(kind: &str) -> Result<String, String> {
    let mut cases = Vec::new();
    for (suite, name) in CASES {
        let s = super::suites::load(suite).map_err(|e| e.to_string())?;
        cases.extend(s.cases.into_iter().filter(|c| c.name == name));
    }
    let data: Vec<_> = cases
        .iter()
        .map(|c| sporkle::data::conv_data(&c.params, c.seed, false))
        .collect();
    let (devices, _) = Device::all();
    let template = devices
        .iter()
        .find(|d| d.kind() == kind)
        .ok_or_else(|| format!("no device {kind} here"))?
        .clone();
    drop(devices);
    let fresh = || template.fresh().map_err(|e| e.to_string());
    let cycles = |device: &Device, count: usize, mut at: Box<dyn FnMut(usize) + '_>| {
        let juggler = device.juggler().ok_or("not a Juggler device")?;
        for i in 0..count {
            let k = i % cases.len();
            let (x, w, b) = &data[k];
            let p = &cases[k].params;
            let bias = cases[k].bias.then_some(&b[..]);
            // Every other cycle from a pinned input, made and dropped with the cycle.
            let (y, _) = if i % 2 == 1 {
                let mut pinned = juggler.pinned_input(x.len()).map_err(|e| e.to_string())?;
                pinned
                    .as_mut_slice()
                    .map_err(|e| e.to_string())?
                    .copy_from_slice(x);
                juggler
                    .submit_pinned(p, &pinned, w[..].into(), bias.map(Into::into))
                    .and_then(sporkle::Ticket::wait)
            } else {
                juggler
                    .submit(p, x, w, bias)
                    .and_then(sporkle::Ticket::wait)
            }
            .map_err(|e| e.to_string())?;
            std::hint::black_box(y);
            // A dropped pinned input is freed by the GPU thread when it next handles anything
            // (a job that went to the CPU wakes nothing): settled before the heap is sampled.
            juggler.settle_gpu().map_err(|e| e.to_string())?;
            at(i + 1);
        }
        Ok::<_, String>(juggler.stats().gpu.calls + juggler.stats().cpu.calls)
    };
    // Warm-up with another Juggler: one-time lazies (the driver's, the suites') settle here.
    cycles(&fresh()?, 20, Box::new(|_| {}))?;
    let before = heap();
    let device = fresh()?;
    let base_live = sporkle::gpu::LiveObjects::now();
    // Heap samples every 10 cycles; transient allocations (the job channel's message blocks,
    // ~19 KB, come and go) make single samples noisy, so the least heap of cycles 500-600 is
    // compared with the least of the last 100. A one-time lazy of ~2 KB was seen settling as
    // late as cycle 500 on llvmpipe, hence the slack; a leak of even 8 bytes per cycle grows
    // 3.2 KB between the windows and fails.
    let tenth = STREAM_CYCLES / 10;
    let (mut early, mut late) = (usize::MAX, usize::MAX);
    let mut marks = sporkle::gpu::LiveObjects::default();
    let calls = cycles(
        &device,
        STREAM_CYCLES,
        Box::new(|done| {
            if done == STREAM_CYCLES / 2 {
                marks = sporkle::gpu::LiveObjects::now();
            }
            if done % 10 == 0 && done > STREAM_CYCLES / 2 && done <= STREAM_CYCLES / 2 + tenth {
                early = early.min(heap());
            }
            if done % 10 == 0 && done > STREAM_CYCLES - tenth {
                late = late.min(heap());
            }
        }),
    )?;
    let (end, end_live) = (late, sporkle::gpu::LiveObjects::now());
    let marks = (early, marks);
    drop(device);
    drop(template);
    let deadline = Instant::now() + Duration::from_secs(2);
    while heap() > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let after = heap();
    let live = sporkle::gpu::LiveObjects::now();
    if end_live != marks.1 {
        return Err(format!(
            "GL objects grew from {:?} to {end_live:?} over {STREAM_CYCLES} submit/wait cycles",
            marks.1
        ));
    }
    if end > marks.0 + STREAM_SLACK {
        return Err(format!(
            "heap in use grew from {} bytes (least of cycles {}-{}) to {end} (least of the last {tenth}) over {STREAM_CYCLES} submit/wait cycles of [{kind}]",
            marks.0,
            STREAM_CYCLES / 2,
            STREAM_CYCLES / 2 + tenth
        ));
    }
    if !live.is_zero() {
        return Err(format!(
            "GL objects alive after the Juggler was dropped: {live:?} (with it: {base_live:?})"
        ));
    }
    if after > before {
        return Err(format!(
            "heap in use {before} bytes before the Juggler and {after} after dropping it"
        ));
    }
    Ok(format!(
        "[{kind}] {STREAM_CYCLES} submit/wait cycles ({calls} calls): heap {} -> {end} bytes, GL objects {:?} -> {end_live:?}, {after} bytes and no GL objects after drop",
        marks.0, marks.1
    ))
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

/// The least heap in use over a third of a second: a dropped backend's threads have exited
/// (its Drop waits), but blocks freed on their way out (and garbage the collector defers)
/// leave the count some time after; read at once, it varied by up to 16 kB between runs.
fn settled_heap() -> usize {
    let mut least = heap();
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(10));
        least = least.min(heap());
    }
    least
}

fn child(kind: &str) -> Result<String, String> {
    check_profiler()?;
    if let Some(kind) = kind.strip_suffix(STREAM_MODE) {
        return stream_child(kind);
    }
    if let Some(kind) = kind.strip_suffix(CALL_MODE) {
        return call_child(kind);
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
    // Two windows of CYCLES cycles. A leak grows the heap in both; a block that some thread
    // holds at one measurement and not at another (on the H200, once, 1880 bytes held after
    // the cycles and not before, where the heap read before the cycles varies by 10 kB between
    // runs) moves one window only. So a window fails only if the other does too.
    let base = settled_heap();
    let mut marks = vec![base];
    for _ in 0..2 {
        for _ in 0..CYCLES {
            cycle()?;
        }
        marks.push(settled_heap());
    }
    let after = marks[2];
    let live = sporkle::gpu::LiveObjects::now();
    if !live.is_zero() {
        return Err(format!(
            "GL objects still alive after every backend was dropped: {live:?}"
        ));
    }
    if marks.windows(2).all(|w| w[1] > w[0] + RUN_DROP_SLACK) {
        return Err(format!(
            "heap in use grew from {base} to {} and then {after} bytes over two windows of {CYCLES} create/run/drop cycles of [{kind}] ({} bytes per cycle)",
            marks[1],
            (after - base) / (2 * CYCLES)
        ));
    }
    Ok(format!(
        "heap in use {base} bytes before, {} and {after} after two windows of {CYCLES} create/run/drop cycles of [{kind}]",
        marks[1]
    ))
}
