//! Trials of the async executor and the Juggler beyond one call at a time (kinds `gpu-async`
//! and `juggler`): mixed streams with weights changing between submissions, several threads
//! submitting at once, async toggled mid-stream, a fence timeout forcing the CPU fallback, a
//! CPU-only Juggler, and device choice. Each trial makes its own Juggler (so no other trial's
//! jobs or settings interleave) and checks every output against the reference, and GPU outputs
//! bit for bit against the synchronous GPU path.

use super::{fail, named, Context, Device};
use libtest_mimic::{Failed, Trial};
use sporkle::gpu::{GpuBackend, GpuChoice};
use sporkle::juggler::{Config, DeviceKind, Juggler, Preference};
use sporkle::suite::Case;
use sporkle::tolerance::{compare, Tolerance};
use sporkle::{data, reference, Conv2dParams};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One job of a stream: parameters and data.
struct Job {
    p: Conv2dParams,
    x: Vec<f32>,
    w: Vec<f32>,
    b: Option<Vec<f32>>,
}

/// `count` jobs cycling through the basic suite's cases. Weights change between submissions:
/// new seeds mostly, the same weights again now and then (a resident hit), and once a single
/// element changed (a stale resident copy would give the old answer).
fn stream(count: usize, seed: u64) -> sporkle::Result<Vec<Job>> {
    let cases: Vec<Case> = super::suites::load("basic")?
        .cases
        .into_iter()
        .filter(|c| !c.exact)
        .collect();
    let mut jobs: Vec<Job> = Vec::new();
    for i in 0..count {
        let case = &cases[i % cases.len()];
        let p = case.params;
        let (x, mut w, b) = data::conv_data(&p, seed + i as u64, false);
        if i >= cases.len() && i % 3 == 0 {
            // The same weights as this case's previous job.
            w.clone_from(&jobs[i - cases.len()].w);
        }
        if i >= cases.len() && i % 7 == 1 {
            w.clone_from(&jobs[i - cases.len()].w);
            let mid = w.len() / 2;
            w[mid] += 0.25;
        }
        jobs.push(Job {
            p,
            x,
            w,
            b: case.bias.then_some(b),
        });
    }
    Ok(jobs)
}

impl Job {
    fn submit(&self, j: &Juggler) -> sporkle::Result<sporkle::Ticket> {
        j.submit(&self.p, &self.x, &self.w, self.b.as_deref())
    }

    /// Submits, waits, and checks the output against the reference.
    fn run_checked(&self, j: &Juggler) -> Result<sporkle::RunInfo, Failed> {
        let (y, info) = self
            .submit(j)
            .and_then(sporkle::Ticket::wait)
            .map_err(fail)?;
        check_reference(self, &y)?;
        Ok(info)
    }
}

/// Submits every job (async on: several in flight at once), in order.
fn submit_all(j: &Juggler, jobs: &[Job]) -> Result<Vec<sporkle::Ticket>, Failed> {
    (jobs.iter())
        .map(|job| job.submit(j))
        .collect::<sporkle::Result<Vec<_>>>()
        .map_err(fail)
}

/// The output is within tolerance of the reference.
fn check_reference(job: &Job, y: &[f32]) -> Result<(), Failed> {
    let r = reference::conv2d_f64(&job.p, &job.x, &job.w, job.b.as_deref()).map_err(fail)?;
    compare(&job.p, y, &r, Tolerance::for_params(&job.p))
        .map(|_| ())
        .map_err(|m| fail(format!("{}: {m}", job.p)))
}

fn juggler(preference: Preference, gpu: GpuChoice, timeout: Duration) -> Result<Juggler, Failed> {
    Juggler::with_config(Config {
        preference,
        gpu: Some(gpu),
        cpu_threads: Some(2),
        fence_timeout: timeout,
        ..Config::default()
    })
    .map_err(fail)
}

/// Submits every job (async on), waits for all, and checks each against the synchronous GPU
/// path and the Juggler's synchronous call (same bits) and the reference; the stream must have
/// had jobs in flight together.
fn mixed_stream(choice: GpuChoice, sync: &GpuBackend) -> Result<(), Failed> {
    let j = juggler(Preference::Gpu, choice, Duration::from_secs(60))?;
    let jobs = stream(30, 11).map_err(fail)?;
    let tickets = submit_all(&j, &jobs)?;
    let (mut runs, mut outputs) = (Vec::new(), Vec::new());
    for (i, (job, t)) in jobs.iter().zip(tickets).enumerate() {
        // Every way of waiting: a new vector, the caller's buffer, reading in place.
        let (y, info) = match i % 3 {
            0 => t.wait().map_err(fail)?,
            1 => {
                let mut y = vec![f32::NAN; job.p.output_len()];
                let info = t.wait_into(&mut y).map_err(fail)?;
                (y, info)
            }
            _ => t.wait_with(<[f32]>::to_vec).map_err(fail)?,
        };
        if info.device != DeviceKind::Gpu || info.fallback.is_some() {
            return Err(fail(format!("job {i} did not run on the GPU: {info:?}")));
        }
        let mut y_sync = vec![0.0f32; y.len()];
        sync.conv2d(&job.p, &job.x, &job.w, job.b.as_deref(), &mut y_sync)
            .map_err(fail)?;
        if let Some(k) = (0..y.len()).find(|&k| y[k].to_bits() != y_sync[k].to_bits()) {
            return Err(fail(format!(
                "job {i} ({}): async output differs from the synchronous path at {k}: {} vs {}",
                job.p, y[k], y_sync[k]
            )));
        }
        check_reference(job, &y)?;
        runs.push(info);
        outputs.push(y);
    }
    // The Juggler's synchronous call (the input staged by the caller, the weights sent after
    // the job) gives the same bits too, on the GPU.
    for (i, (job, y)) in jobs.iter().zip(&outputs).enumerate() {
        let mut y_call = vec![f32::NAN; y.len()];
        let info =
            (j.conv2d(&job.p, &job.x, &job.w, job.b.as_deref(), &mut y_call)).map_err(fail)?;
        if info.device != DeviceKind::Gpu || info.fallback.is_some() {
            return Err(fail(format!("call {i} did not run on the GPU: {info:?}")));
        }
        if let Some(k) = (0..y.len()).find(|&k| y[k].to_bits() != y_call[k].to_bits()) {
            return Err(fail(format!(
                "job {i} ({}): Juggler::conv2d differs from the async output at {k}: {} vs {}",
                job.p, y_call[k], y[k]
            )));
        }
    }
    // A buffer of the wrong length is an error, not a panic, and the GPU stays healthy.
    let job = &jobs[0];
    let mut short = vec![0.0f32; job.p.output_len() - 1];
    let wrong = job.submit(&j).map_err(fail)?.wait_into(&mut short);
    if wrong.is_ok() {
        return Err("wait_into accepted an output buffer of the wrong length".into());
    }
    let s = j.stats();
    check_pipelined(&runs, false)?;
    if s.max_in_flight < 2 {
        return Err(fail(format!(
            "no two jobs were ever in flight together (async on): {s}"
        )));
    }
    if s.gpu.cache_hits == 0 || s.gpu.weight_uploads == 0 {
        return Err(fail(format!(
            "expected both weight uploads and resident hits: {s}"
        )));
    }
    eprintln!("{s}");
    Ok(())
}

/// The executor's pipeline ran: some jobs shared steps with others, and with `fusion` (and
/// shader copies, the default without CUDA) some had their copies fused into a convolution's
/// dispatch. How many depends on timing (a step without a new job is recorded when the GPU is
/// idle), so only a burst of jobs that need no host copy (pinned inputs) is sure to show fused
/// copies. With CUDA copies, every job must have had them.
fn check_pipelined(runs: &[sporkle::RunInfo], fusion: bool) -> Result<(), Failed> {
    let stages: Vec<_> = runs.iter().filter_map(|r| r.stages).collect();
    let shared = stages.iter().filter(|s| s.steps_shared).count();
    let fused = stages.iter().filter(|s| s.fused).count();
    let cuda = stages.iter().filter(|s| s.cuda_copies).count();
    if cuda > 0 && cuda < stages.len() {
        return Err(fail(format!(
            "{cuda} of {} GPU jobs had CUDA copies: the copy mode changed mid-stream",
            stages.len()
        )));
    }
    let dma = sporkle::gpu::StreamCopy::from_env() == sporkle::gpu::StreamCopy::Dma;
    let fusing = cuda == 0 && fusion && !dma;
    if shared == 0 || (fusing && fused == 0) {
        return Err(fail(format!(
            "of {} GPU jobs streamed together, {shared} shared a step and {fused} had fused \
             copies: the pipeline did not run",
            stages.len()
        )));
    }
    // Batches in parts along n: asked for (SPORKLE_STREAM_PARTS) where copies are not fused,
    // some job must have run in parts, or the trial would prove nothing about them.
    let in_parts = stages.iter().filter(|s| s.parts > 1).count();
    let parts_wanted = sporkle::gpu::parts_from_env().is_some_and(|n| n > 1);
    if parts_wanted && (cuda > 0 || dma) && in_parts == 0 {
        return Err(fail(format!(
            "SPORKLE_STREAM_PARTS asks for parts, but none of {} GPU jobs ran in parts",
            stages.len()
        )));
    }
    eprintln!(
        "{shared} of {} jobs shared steps, {fused} had fused copies, {in_parts} ran in parts",
        stages.len()
    );
    Ok(())
}

/// Inputs in pinned buffers: each written once and submitted twice with both jobs in flight;
/// every output checked against the reference and bit for bit against the synchronous GPU
/// path; writing a buffer that jobs still read is an error, and after their waits it is not.
fn pinned_inputs(choice: GpuChoice, sync: &GpuBackend) -> Result<(), Failed> {
    let j = juggler(Preference::Gpu, choice, Duration::from_secs(60))?;
    let jobs = stream(12, 23).map_err(fail)?;
    let mut pinned = Vec::new();
    for job in &jobs {
        let mut b = j.pinned_input(job.x.len()).map_err(fail)?;
        if !b.is_mapped() {
            return Err(fail(
                "a Juggler with a GPU gave a pinned input in plain memory",
            ));
        }
        b.as_mut_slice().map_err(fail)?.copy_from_slice(&job.x);
        pinned.push(b);
    }
    let submit = |job: &Job, b: &sporkle::PinnedInput<'_>| {
        j.submit_pinned(
            &job.p,
            b,
            job.w[..].into(),
            job.b.as_deref().map(Into::into),
        )
    };
    let mut tickets = Vec::new();
    for (job, b) in jobs.iter().zip(&pinned) {
        tickets.push(submit(job, b).map_err(fail)?);
        tickets.push(submit(job, b).map_err(fail)?);
    }
    if pinned[0].as_mut_slice().is_ok() {
        return Err("a pinned input was writable while jobs read it".into());
    }
    let mut runs = Vec::new();
    for (i, t) in tickets.into_iter().enumerate() {
        let job = &jobs[i / 2];
        let (y, info) = t.wait().map_err(fail)?;
        if info.device != DeviceKind::Gpu || info.fallback.is_some() {
            return Err(fail(format!("job {i} did not run on the GPU: {info:?}")));
        }
        let mut y_sync = vec![0.0f32; y.len()];
        sync.conv2d(&job.p, &job.x, &job.w, job.b.as_deref(), &mut y_sync)
            .map_err(fail)?;
        if y.iter()
            .zip(&y_sync)
            .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            return Err(fail(format!(
                "job {i} ({}): the output from a pinned input differs from the synchronous path",
                job.p
            )));
        }
        check_reference(job, &y)?;
        runs.push(info);
    }
    check_pipelined(&runs, true)?;
    // Every ticket waited: writable again, and a new batch streams from it.
    let job = Job {
        p: jobs[0].p,
        x: jobs[0].x.iter().map(|v| -v).collect(),
        w: jobs[0].w.clone(),
        b: jobs[0].b.clone(),
    };
    pinned[0]
        .as_mut_slice()
        .map_err(|e| fail(format!("after every wait: {e}")))?
        .copy_from_slice(&job.x);
    let (y, _) = submit(&job, &pinned[0])
        .and_then(sporkle::Ticket::wait)
        .map_err(fail)?;
    check_reference(&job, &y)?;
    // Another Juggler's pinned input is copied like host memory: its buffer id names one of
    // this Juggler's own buffers too (ids count from 1 in each), which must not be read.
    let other = juggler(Preference::Gpu, choice, Duration::from_secs(60))?;
    let mut foreign = other.pinned_input(job.x.len()).map_err(fail)?;
    let half = Job {
        x: jobs[0].x.iter().map(|v| 0.5 * v).collect(),
        ..job
    };
    foreign
        .as_mut_slice()
        .map_err(fail)?
        .copy_from_slice(&half.x);
    let (y, _) = submit(&half, &foreign)
        .and_then(sporkle::Ticket::wait)
        .map_err(fail)?;
    check_reference(&half, &y).map_err(|e| {
        fail(format!(
            "another Juggler's pinned input: {}",
            e.message().unwrap_or("wrong")
        ))
    })?;
    // A pinned input of the wrong length is an error, not a panic.
    if submit(&jobs[0], &pinned[1]).is_ok() && jobs[0].x.len() != jobs[1].x.len() {
        return Err("a pinned input of the wrong length was accepted".into());
    }
    Ok(())
}

/// Four threads submit and wait at once on one Juggler.
fn threads(choice: GpuChoice) -> Result<(), Failed> {
    let j = Arc::new(juggler(Preference::Gpu, choice, Duration::from_secs(60))?);
    let results: Vec<Result<(), Failed>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let j = Arc::clone(&j);
                s.spawn(move || -> Result<(), Failed> {
                    let jobs = stream(8, 100 * t).map_err(fail)?;
                    let tickets = submit_all(&j, &jobs)?;
                    for (job, t) in jobs.iter().zip(tickets) {
                        let (y, info) = t.wait().map_err(fail)?;
                        if info.fallback.is_some() {
                            return Err(fail(format!("fell back to the CPU: {info:?}")));
                        }
                        check_reference(job, &y)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a submitting thread panicked".into()))
            })
            .collect()
    });
    results.into_iter().collect::<Result<Vec<()>, Failed>>()?;
    let s = j.stats();
    if s.gpu.calls != 32 {
        return Err(fail(format!("expected 32 GPU calls: {s}")));
    }
    Ok(())
}

/// Async on, off, on again while jobs are in flight: every output still right.
fn toggled(choice: GpuChoice) -> Result<(), Failed> {
    let j = juggler(Preference::Gpu, choice, Duration::from_secs(60))?;
    let jobs = stream(18, 7).map_err(fail)?;
    let mut tickets = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        if i == 6 {
            j.set_async(false);
        }
        if i == 12 {
            j.set_async(true);
        }
        tickets.push(job.submit(&j).map_err(fail)?);
    }
    if !j.is_async() {
        return Err("set_async(true) did not stick".into());
    }
    for (i, (job, t)) in jobs.iter().zip(tickets).enumerate() {
        let (y, info) = t.wait().map_err(fail)?;
        check_reference(job, &y)?;
        // A job submitted with async off runs alone: no other job in flight, no step shared.
        let alone = info
            .stages
            .is_some_and(|s| s.in_flight == 1 && !s.steps_shared);
        if (6..12).contains(&i) && !alone {
            return Err(fail(format!(
                "job {i} ran with async off, yet not alone: {:?}",
                info.stages
            )));
        }
    }
    Ok(())
}

/// A fence timeout of one nanosecond: the job is re-run on the CPU (right output), counted,
/// and the GPU is marked unhealthy so the next job goes to the CPU with the reason.
fn fence_timeout(choice: GpuChoice) -> Result<(), Failed> {
    let j = juggler(Preference::Gpu, choice, Duration::from_nanos(1))?;
    let jobs = stream(2, 3).map_err(fail)?;
    let info = jobs[0].run_checked(&j)?;
    let why = info.fallback.clone().unwrap_or_default();
    if info.device != DeviceKind::Cpu || !why.contains("fence") {
        return Err(fail(format!(
            "expected a fence timeout and a CPU re-run: {info:?}"
        )));
    }
    let next = jobs[1].run_checked(&j)?;
    if next.device != DeviceKind::Cpu || !next.reason.contains("unhealthy") {
        return Err(fail(format!(
            "after a timeout the GPU must be left, with the reason: {next:?}"
        )));
    }
    let s = j.stats();
    if (s.timeouts, s.fallbacks, s.cpu.calls) != (1, 1, 2) {
        return Err(fail(format!(
            "expected 1 timeout, 1 fallback, 2 CPU calls: {s}"
        )));
    }
    Ok(())
}

/// A synchronous GPU call convolves with a guess at its weights (the set its slice held when
/// last keyed; forced here, since small weights are usually hashed before the convolution
/// starts) and is answered only once their hash confirms it: weights changed in place between
/// calls (same address and length) run again with their true bytes, counted as one re-run in
/// the call's stages and the statistics; unchanged ones are not re-run. Exact data, so every
/// output is checked bit for bit.
fn weights_guess_checked(choice: GpuChoice) -> Result<(), Failed> {
    let j = juggler(Preference::Gpu, choice, Duration::from_secs(60))?;
    j.force_gpu_weights_guess(true).map_err(fail)?;
    let p = Conv2dParams::new(1, 16, 10, 10, 32, 3, 3).with_padding(1, 1);
    let (x, mut w, _) = data::conv_data(&p, 12, true);
    let mut y = vec![f32::NAN; p.output_len()];
    // Per call: whether the weights change in place first, and the re-runs expected (the first
    // call has no guess yet).
    let calls = [(false, 0), (false, 0), (true, 1), (false, 0), (true, 1)];
    for (call, (change, reruns)) in calls.into_iter().enumerate() {
        if change {
            *w.last_mut().expect("weights") += 1.0;
        }
        let info = j.conv2d(&p, &x, &w, None, &mut y).map_err(fail)?;
        let got = info.stages.map(|s| s.reruns);
        if info.device != DeviceKind::Gpu || got != Some(reruns) {
            return Err(fail(format!(
                "call {}: expected a GPU run with {reruns} re-run(s), got {got:?}: {info:?}",
                call + 1
            )));
        }
        let r = reference::conv2d_f64(&p, &x, &w, None).map_err(fail)?;
        compare(&p, &y, &r, Tolerance::Exact).map_err(|m| {
            fail(format!(
                "call {} (weights changed: {change}): {m}",
                call + 1
            ))
        })?;
    }
    let s = j.stats();
    if s.reruns != 2 || s.fallbacks != 0 {
        return Err(fail(format!("expected 2 re-runs and no fallback: {s}")));
    }
    Ok(())
}

/// How long the injected-fault trials let a fence run before its deadline.
const FAULT_DEADLINE: Duration = Duration::from_millis(200);

/// The synchronous GPU path with fences that never pass (injected): the call waits out its
/// deadline (a wait that returns early fails this), fails with `Error::FenceTimeout`, writes
/// nothing into the output; with the fault gone the same backend runs correctly again.
fn sync_fence_timeout(choice: GpuChoice) -> Result<(), Failed> {
    let gpu = GpuBackend::with_choice(choice).map_err(fail)?;
    let p = Conv2dParams::new(1, 8, 12, 12, 16, 3, 3).with_padding(1, 1);
    let (x, w, _) = data::conv_data(&p, 5, false);
    let mut y = vec![f32::NAN; p.output_len()];
    gpu.set_fence_timeout(FAULT_DEADLINE).map_err(fail)?;
    gpu.inject_fence_fault(true).map_err(fail)?;
    let start = Instant::now();
    let result = gpu.conv2d(&p, &x, &w, None, &mut y);
    let waited = start.elapsed();
    if !matches!(result, Err(sporkle::Error::FenceTimeout(_))) {
        return Err(fail(format!("expected a fence timeout, got {result:?}")));
    }
    if waited < FAULT_DEADLINE {
        return Err(fail(format!(
            "the call failed after {waited:?}, before its {FAULT_DEADLINE:?} deadline: the fence wait did not wait"
        )));
    }
    if y.iter().any(|v| !v.is_nan()) {
        return Err(fail("a call whose fence timed out wrote into the output"));
    }
    gpu.inject_fence_fault(false).map_err(fail)?;
    // The backend recovers: a call with the default deadline (60 s) runs on the GPU. (With the
    // fault's 200 ms deadline it failed once on the H200, where the validation's other trials
    // share the GPU: the fence passed after 224 ms.)
    gpu.set_fence_timeout(Duration::from_secs(60))
        .map_err(fail)?;
    gpu.conv2d(&p, &x, &w, None, &mut y).map_err(fail)?;
    check_sampled(&p, &x, &w, &y)
}

/// The executor with fences that never pass (injected) and a real deadline (the 1 ns trial's
/// deadline has passed before any wait): the Juggler waits it out, re-runs the job on the CPU
/// with the right output, and counts one timeout.
fn stream_fence_never_passes(choice: GpuChoice) -> Result<(), Failed> {
    let j = juggler(Preference::Gpu, choice, FAULT_DEADLINE)?;
    j.inject_gpu_fence_fault(true).map_err(fail)?;
    let jobs = stream(1, 41).map_err(fail)?;
    let start = Instant::now();
    let info = jobs[0].run_checked(&j)?;
    let waited = start.elapsed();
    let why = info.fallback.clone().unwrap_or_default();
    if info.device != DeviceKind::Cpu || !why.contains("fence") {
        return Err(fail(format!(
            "expected a fence timeout and a CPU re-run: {info:?}"
        )));
    }
    if waited < FAULT_DEADLINE {
        return Err(fail(format!(
            "the job fell back after {waited:?}, before its {FAULT_DEADLINE:?} deadline: the fence wait did not wait"
        )));
    }
    let s = j.stats();
    if (s.timeouts, s.fallbacks) != (1, 1) {
        return Err(fail(format!("expected 1 timeout and 1 fallback: {s}")));
    }
    Ok(())
}

/// A sampled check of a Juggler result of `p` (no bias), with the tolerance that holds for
/// whichever algorithm the device chose.
fn check_sampled(p: &Conv2dParams, x: &[f32], w: &[f32], y: &[f32]) -> Result<(), Failed> {
    let tol = Tolerance::for_params(p);
    sporkle::tolerance::check_sample(p, x, w, None, y, 64, tol)
        .map(|_| ())
        .map_err(|m| fail(format!("{p}: {m}")))
}

/// A job over a GL limit (here the largest storage buffer): a clear GPU error, the CPU does the
/// job, and the GPU is not marked unhealthy: the next small job runs there again.
fn over_gl_limit(choice: GpuChoice, max_storage_block: i64) -> Result<(), Failed> {
    let j = juggler(Preference::Gpu, choice, Duration::from_secs(60))?;
    // One channel, 1x1: an output (and input) just over the limit, a cheap job for the CPU.
    let side = ((max_storage_block as f64 / 4.0).sqrt().ceil() as usize) + 8;
    let p = Conv2dParams::new(1, 1, side, side, 1, 1, 1);
    let (x, w, _) = data::conv_data(&p, 9, false);
    let (y, info) = j
        .submit(&p, &x, &w, None)
        .map_err(fail)?
        .wait()
        .map_err(fail)?;
    check_sampled(&p, &x, &w, &y)?;
    let why = info.fallback.clone().unwrap_or_default();
    if info.device != DeviceKind::Cpu || !why.contains("GPU limit") {
        return Err(fail(format!(
            "expected a GPU limit error and a CPU run: {info:?}"
        )));
    }
    let jobs = stream(1, 4).map_err(fail)?;
    let next = jobs[0].run_checked(&j)?;
    if next.device != DeviceKind::Gpu {
        return Err(fail(format!(
            "a job over a limit must not mark the GPU unhealthy: {next:?}"
        )));
    }
    Ok(())
}

/// `SPORKLE_GPU=off` (here: the same choice in the config): a CPU-only Juggler that says why.
fn gpu_off() -> Result<(), Failed> {
    let j = juggler(Preference::Auto, GpuChoice::Off, Duration::from_secs(60))?;
    let jobs = stream(4, 5).map_err(fail)?;
    for job in &jobs {
        let mut y = vec![0.0f32; job.p.output_len()];
        let info = j
            .conv2d(&job.p, &job.x, &job.w, job.b.as_deref(), &mut y)
            .map_err(fail)?;
        if info.device != DeviceKind::Cpu || !info.reason.contains("off") {
            return Err(fail(format!(
                "expected the CPU, saying the GPU is off: {info:?}"
            )));
        }
        check_reference(job, &y)?;
    }
    // A pinned input without a GPU is plain memory, and works the same.
    let job = &jobs[0];
    let mut pinned = j.pinned_input(job.x.len()).map_err(fail)?;
    if pinned.is_mapped() {
        return Err("a CPU-only Juggler gave a mapped pinned input".into());
    }
    pinned.as_mut_slice().map_err(fail)?.copy_from_slice(&job.x);
    let (y, info) = j
        .submit_pinned(
            &job.p,
            &pinned,
            job.w[..].into(),
            job.b.as_deref().map(Into::into),
        )
        .and_then(sporkle::Ticket::wait)
        .map_err(fail)?;
    if info.device != DeviceKind::Cpu {
        return Err(fail(format!("expected the CPU: {info:?}")));
    }
    check_reference(job, &y)?;
    let s = j.stats();
    if s.gpu_unavailable.is_none() || s.cpu.calls != 5 || s.utilisation(DeviceKind::Cpu) <= 0.0 {
        return Err(fail(format!("statistics do not show a CPU-only run: {s}")));
    }
    Ok(())
}

/// Auto: below the floor the CPU; above it, once both devices have a measurement of the shape,
/// the one measured faster (judged from the measurements the last choice was made from: on the
/// H200 the last of four calls was once the GPU's first measured one, a trial the model
/// allowed); a device never measured is tried while the model gives it a chance.
fn auto_choice(choice: GpuChoice) -> Result<(), Failed> {
    let j = juggler(Preference::Auto, choice, Duration::from_secs(60))?;
    let small = Conv2dParams::new(1, 8, 10, 10, 8, 3, 3);
    let (x, w, _) = data::conv_data(&small, 1, false);
    let mut y = vec![0.0f32; small.output_len()];
    let before = j.stats();
    let info = j.conv2d(&small, &x, &w, None, &mut y).map_err(fail)?;
    check_info_against_stats(&small, &info, &before, &j.stats())?;
    if info.device != DeviceKind::Cpu || !info.reason.contains("floor") {
        return Err(fail(format!("a tiny job must stay on the CPU: {info:?}")));
    }
    // 693 MFLOP: above the floor.
    let big = Conv2dParams::new(1, 64, 56, 56, 192, 3, 3).with_padding(1, 1);
    let (x, w, _) = data::conv_data(&big, 2, false);
    let mut y = vec![0.0f32; big.output_len()];
    let mut last = None;
    for _ in 0..4 {
        let before = j.stats();
        // What the last choice was made from: a call's own time is recorded after it.
        let measured = j.measured(&big);
        let info = j.conv2d(&big, &x, &w, None, &mut y).map_err(fail)?;
        check_info_against_stats(&big, &info, &before, &j.stats())?;
        last = Some((info, measured));
    }
    let (info, [cpu, gpu]) = last.expect("ran");
    check_sampled(&big, &x, &w, &y)?;
    // Five user calls; the calibration's own runs are not counted as calls.
    let s = j.stats();
    if s.cpu.calls + s.gpu.calls != 5 {
        return Err(fail(format!("expected 5 calls in the statistics: {s}")));
    }
    // Both measured: the faster, or the slower re-measured now and then, saying so.
    let ok = match (cpu, gpu) {
        (Some(c), Some(g)) => {
            let faster = if g < c {
                DeviceKind::Gpu
            } else {
                DeviceKind::Cpu
            };
            info.device == faster || info.reason.contains("re-measuring the slower")
        }
        _ => info.reason.contains("model predicts"),
    };
    if !ok {
        return Err(fail(format!(
            "auto chose {} ({}) with measurements before it cpu {cpu:?} s, gpu {gpu:?} s",
            info.device, info.reason
        )));
    }
    eprintln!(
        "auto chose {} for {big}: {} (measured before it: cpu {cpu:?} s, gpu {gpu:?} s; after \
         it: {:?})",
        info.device,
        info.reason,
        j.measured(&big)
    );
    Ok(())
}

/// What a job's `RunInfo` says agrees with the statistics it moved (`before` to `after`): one
/// call more on its device and none on the other (a fallback counts one too), its FLOPs there, a
/// window at least as long as the job's busy time, and a job said to have run on the GPU has the
/// GPU's stage times (and a kernel time where the GPU's timers mean something) and moved bytes
/// over the bus.
fn check_info_against_stats(
    p: &Conv2dParams,
    info: &sporkle::RunInfo,
    before: &sporkle::Stats,
    after: &sporkle::Stats,
) -> Result<(), Failed> {
    let (ran, other) = match info.device {
        DeviceKind::Cpu => ((&before.cpu, &after.cpu), (&before.gpu, &after.gpu)),
        DeviceKind::Gpu => ((&before.gpu, &after.gpu), (&before.cpu, &after.cpu)),
    };
    let wrong = |what: &str| {
        Err(fail(format!(
            "RunInfo says {} ({}), but {what}: before {before}, after {after}",
            info.device, info.reason
        )))
    };
    if ran.1.calls != ran.0.calls + 1 || ran.1.flops != ran.0.flops + p.flops() {
        return wrong("that device's calls and FLOPs did not move by one job");
    }
    if other.1.calls != other.0.calls || other.1.flops != other.0.flops {
        return wrong("the other device's counters moved");
    }
    // The statistics' window opens at the start of the first job, so it spans at least the
    // busy time it has seen (a window timed from a job's end would not).
    if after.window_s < ran.1.busy_s - ran.0.busy_s {
        return wrong("the statistics' window is shorter than the job's busy time");
    }
    if info.device == DeviceKind::Gpu {
        let Some(stages) = info.stages else {
            return wrong("it has no GPU stage times");
        };
        if after.gpu_timed && (info.gpu_kernel_s.is_none() || stages.kernel_s.is_none()) {
            return wrong("the GPU's timers work here and it has no kernel time");
        }
        if ran.1.bytes_up <= ran.0.bytes_up || ran.1.bytes_down <= ran.0.bytes_down {
            return wrong("no bytes crossed the bus");
        }
    } else if info.stages.is_some() || info.gpu_kernel_s.is_some() {
        return wrong("it has GPU times");
    }
    Ok(())
}

/// `Auto`'s GPU branch, on any GPU (llvmpipe included, which it never picks by measurement):
/// with no floor and the model's rates fixed so that the GPU looks far faster, a new shape
/// goes to the GPU by the model, then by its measurement, synchronously and streamed; every
/// `RunInfo` agrees with the statistics it moved, and every output with the reference.
fn auto_gpu_branch(choice: GpuChoice) -> Result<(), Failed> {
    let j = Juggler::with_config(Config {
        preference: Preference::Auto,
        gpu: Some(choice),
        cpu_threads: Some(2),
        min_gpu_flops: 0,
        fixed_rates: Some(sporkle::juggler::Rates {
            // So slow that the CPU is never worth trying (a loaded GPU measured 92 ms here once).
            cpu_flops: 1.0,
            gpu_flops: 1e15,
            transfer_bytes: 1e15,
        }),
        ..Config::default()
    })
    .map_err(fail)?;
    let p = Conv2dParams::new(1, 8, 12, 12, 16, 3, 3).with_padding(1, 1);
    let (x, w, _) = data::conv_data(&p, 3, false);
    // A device's first call of a shape is a warm-up, measuring nothing: the model decides twice.
    let expected = [
        "model predicts",
        "model predicts",
        "measured gpu",
        "measured gpu",
    ];
    for (i, why) in expected.iter().enumerate() {
        let before = j.stats();
        let mut y = vec![f32::NAN; p.output_len()];
        let info = if i < 3 {
            j.conv2d(&p, &x, &w, None, &mut y).map_err(fail)?
        } else {
            let (out, info) = j
                .submit(&p, &x, &w, None)
                .and_then(sporkle::Ticket::wait)
                .map_err(fail)?;
            y = out;
            info
        };
        if info.device != DeviceKind::Gpu || !info.reason.contains(why) || info.fallback.is_some() {
            return Err(fail(format!(
                "call {i}: expected the GPU by '{why}': {info:?}"
            )));
        }
        check_info_against_stats(&p, &info, &before, &j.stats())?;
        check_sampled(&p, &x, &w, &y)?;
    }
    Ok(())
}

/// Where a CUDA driver is present and no other copy mode is chosen, streaming jobs are copied by
/// CUDA (every one, each output within tolerance of the reference); elsewhere the trial says
/// why it cannot run. The other stream trials then exercise the CUDA path too.
/// Why `stream/cuda_copies` cannot run here, if it cannot (known before any trial runs).
fn cuda_copies_missing() -> Option<String> {
    if !sporkle::gpu::cu::driver_present() {
        return Some(
            "no CUDA driver (libcuda) on this machine: the CUDA copy path is not tested here"
                .into(),
        );
    }
    if !matches!(
        sporkle::gpu::StreamCopy::from_env(),
        sporkle::gpu::StreamCopy::Cuda { .. }
    ) {
        return Some("SPORKLE_STREAM_COPY chooses other copies than CUDA's".into());
    }
    None
}

fn cuda_copies(choice: GpuChoice) -> Result<libtest_mimic::Completion, Failed> {
    if let Some(why) = cuda_copies_missing() {
        return Ok(libtest_mimic::Completion::ignored_with(why));
    }
    let j = juggler(Preference::Gpu, choice, Duration::from_secs(60))?;
    let jobs = stream(9, 29).map_err(fail)?;
    let tickets = submit_all(&j, &jobs)?;
    for (i, (job, t)) in jobs.iter().zip(tickets).enumerate() {
        let (y, info) = t.wait().map_err(fail)?;
        if info.device != DeviceKind::Gpu || info.fallback.is_some() {
            return Err(fail(format!("job {i} did not run on the GPU: {info:?}")));
        }
        if !info.stages.is_some_and(|s| s.cuda_copies) {
            return Err(fail(format!(
                "job {i}: a CUDA driver is present but CUDA did not copy (see the warning \
                 above for why; SPORKLE_STREAM_COPY=shader opts out)"
            )));
        }
        check_reference(job, &y)?;
    }
    eprintln!("{} jobs copied by CUDA, every output checked", jobs.len());
    sync_call_in_parts(&j)?;
    Ok(libtest_mimic::Completion::Completed)
}

/// A synchronous call big enough for parts (16.8 MB in and out, n = 2) runs in them with CUDA
/// copies, as a pipelined job would: its copies then overlap its convolution. Right output.
fn sync_call_in_parts(j: &Juggler) -> Result<(), Failed> {
    let p = Conv2dParams::new(2, 64, 128, 128, 64, 1, 1);
    if (p.input_len() + p.output_len()) * 4 < sporkle::gpu::PARTS_MIN_BYTES {
        return Err(fail(format!("{p} is too small for parts (trial bug)")));
    }
    let (x, w, b) = data::conv_data(&p, 77, false);
    let job = Job {
        p,
        x,
        w,
        b: Some(b),
    };
    let mut y = vec![0.0f32; p.output_len()];
    let info = (j.conv2d(&p, &job.x, &job.w, job.b.as_deref(), &mut y)).map_err(fail)?;
    let parts = info.stages.map_or(0, |s| s.parts);
    let wanted = sporkle::gpu::parts_from_env()
        .unwrap_or(sporkle::gpu::PARTS)
        .min(p.n);
    if info.device != DeviceKind::Gpu || parts != wanted {
        return Err(fail(format!(
            "a synchronous call of {p} ran on the {} in {parts} part(s), expected {wanted} on the GPU: {info:?}",
            info.device
        )));
    }
    check_reference(&job, &y)?;
    eprintln!("a synchronous call of {p} ran in {parts} parts, output checked");
    Ok(())
}

pub fn trials(ctx: &Arc<Context>) -> Vec<Trial> {
    let mut out = vec![Trial::test(named("juggler", "fault/gpu_off"), gpu_off)];
    let choice = GpuChoice::from_env().unwrap_or(GpuChoice::Off);
    let auto_gpu = if ctx.gpu_absence.is_some() {
        GpuChoice::Off
    } else {
        choice
    };
    out.push(Trial::test(named("juggler", "auto/choice"), move || {
        auto_choice(auto_gpu)
    }));
    let Some(sync) = ctx.devices.iter().find_map(|d| match d {
        Device::Gpu { backend } => Some(Arc::clone(backend)),
        _ => None,
    }) else {
        return out;
    };
    out.push(Trial::test(
        named("juggler", "auto/gpu_branch"),
        move || auto_gpu_branch(choice),
    ));
    let sync_mixed = Arc::clone(&sync);
    out.push(Trial::test(
        named("gpu-async", "stream/mixed_changing_weights"),
        move || mixed_stream(choice, &sync_mixed),
    ));
    let sync_pinned = Arc::clone(&sync);
    out.push(Trial::test(
        named("gpu-async", "stream/pinned_inputs"),
        move || pinned_inputs(choice, &sync_pinned),
    ));
    out.push(Trial::test(
        named("gpu-async", "stream/threads"),
        move || threads(choice),
    ));
    out.push(super::unless_missing(
        Trial::ignorable_test(named("gpu-async", "stream/cuda_copies"), move || {
            cuda_copies(choice)
        }),
        cuda_copies_missing(),
    ));
    out.push(Trial::test(
        named("gpu-async", "stream/async_toggled"),
        move || toggled(choice),
    ));
    out.push(Trial::test(
        named("gpu-async", "fault/fence_timeout"),
        move || fence_timeout(choice),
    ));
    out.push(Trial::test(
        named("gpu-async", "fault/fence_never_passes"),
        move || stream_fence_never_passes(choice),
    ));
    out.push(Trial::test(
        named("gpu", "weights/guess_checked"),
        move || weights_guess_checked(choice),
    ));
    out.push(Trial::test(
        named("gpu", "fault/sync_fence_timeout"),
        move || sync_fence_timeout(choice),
    ));
    let limit = ctx
        .devices
        .iter()
        .find_map(|d| match d {
            Device::Gpu { backend } => Some(backend.info().max_storage_block),
            _ => None,
        })
        .unwrap_or(i64::MAX);
    // Exceeding a 2 GiB limit would need a 2 GiB job: only cheap limits are tested.
    let too_large = (limit > 256 << 20).then(|| {
        format!(
            "the storage block limit here ({} MiB) is too large to exceed cheaply",
            limit >> 20
        )
    });
    let why = too_large.clone();
    out.push(super::unless_missing(
        Trial::ignorable_test(named("gpu-async", "fault/over_gl_limit"), move || {
            if let Some(why) = why {
                return Ok(libtest_mimic::Completion::ignored_with(why));
            }
            over_gl_limit(choice, limit).map(|()| libtest_mimic::Completion::Completed)
        }),
        too_large,
    ));
    out
}
