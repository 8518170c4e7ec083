//! Frames and the steps that move them: a frame's buffers and the job in it ([`Frame`],
//! [`Flight`]), the timer queries, fences and CUDA events of a step ([`StepTimes`], [`Marker`]),
//! and the [`Encoder`], which records a step's GL work and starts its CUDA copies on the frames
//! the executor lends it. The executor decides which jobs a step runs; this module records it.
//!
//! A step runs phase 1 (copy in) of the newest job, phase 2 (convolve) of the one before and
//! phase 3 (copy out) of the one before that. How the copies run is the executor's
//! [`StreamCopy`]:
//! - CUDA copies (the default where CUDA opens, `cu.rs`): on two CUDA streams (in, out), timed
//!   by events, while GL only convolves. The host orders the APIs: a step starts the copy in,
//!   starts the copy out once the previous step's convolution has passed its fence, and
//!   dispatches the convolution once the previous step's copy in has passed its event; a step
//!   without a new job is recorded as soon as it would not block, or where only its copy out
//!   could start, that copy out alone (`Executor::step_copy_out_early`). (Ordering the APIs on
//!   the GPU with shared semaphores was slower: `docs/experiments.md`.)
//! - Shader copies (the default otherwise): workgroups of the convolution's own dispatch where
//!   its plan is one pass, after one barrier, then one fence, so the GPU moves data both ways
//!   while it convolves (one context runs DMA copies and dispatches one after another:
//!   measured, `overlap::probe_zero_copy`). A step without a new job is recorded only when the
//!   GPU has finished every step so far (and, if a job is about to join, `IDLE_GRACE` has
//!   passed), so that a steady stream keeps its phases together.
//!
//! A big job runs its batch in parts along n (`gpu::PARTS`, with CUDA copies), pipelined or
//! alone: each part of each phase ends at its own event or fence, and each part of the next
//! phase waits only for its own part of the one before, so a job's convolution starts on the
//! first part of its input and its copy out on the first part of its output (a shorter start
//! and end of a stream, and a synchronous call's copies overlapping its convolution). A part
//! runs the whole batch's tile and algorithm, on buffer ranges.

#![forbid(unsafe_code)]

use super::cu::{elapsed_ns, CudaCopies, Event, TimedCopy};
use super::gl::{self, Buffer, Direction, Fence, MappedBuffer, TimerQuery};
use super::job::{past_deadline, StreamDone, StreamJob};
use super::memory::{DeviceMem, HostMem};
use super::plan::{Bindings, FusedPass, Plan, Planner};
use super::resident::ResidentWeights;
use super::shaders::{self, StreamCopy};
use crate::error::{Error, Result};
use crate::pinned::StreamInput;
use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// One frame's buffers, and the job in it. Staging and device buffers hold whole vec4s (the
/// shader copies move vec4s).
#[derive(Default)]
pub(super) struct Frame {
    pub(super) upload: Option<HostMem>,
    pub(super) download: Option<HostMem>,
    pub(super) input: Option<DeviceMem>,
    pub(super) output: Option<DeviceMem>,
    pub(super) bias: Option<Buffer>,
    /// The plan's intermediates (split-K partial sums, Winograd's transforms).
    pub(super) scratch: [Option<Buffer>; 2],
    pub(super) flight: Option<Flight>,
}

impl Frame {
    /// The job in flight in this frame.
    pub(super) fn flight(&self) -> &Flight {
        self.flight
            .as_ref()
            .expect("a frame in flight holds its job")
    }
}

/// What a job's frame was made ready with (`Executor::try_fill`).
pub(super) struct Planned {
    /// One part's plan.
    pub(super) plan: Rc<Plan>,
    pub(super) parts: usize,
    /// As [`Flight`]'s.
    pub(super) fused: Option<(String, u32)>,
    pub(super) done: StreamDone,
}

/// A job whose input is being copied into its frame's upload staging on another thread.
pub(super) struct Filling {
    pub(super) slot: usize,
    pub(super) flight: Flight,
    /// The copy's wall time (s), when it is done.
    pub(super) copied: mpsc::Receiver<f64>,
}

/// A job in the pipeline, from its start until it is answered.
pub(super) struct Flight {
    pub(super) job: StreamJob,
    /// The plan of one part of its batch (all of it where it runs in one part).
    pub(super) plan: Rc<Plan>,
    /// Parts its batch runs in along n (`Executor::parts_for`): each part's copies and
    /// convolution are waited for on their own, so the next phase starts on the first part
    /// while the others are still in the one before.
    pub(super) parts: usize,
    /// Its convolution fused with the copies: the program's source and its copying layers.
    pub(super) fused: Option<(String, u32)>,
    /// Steps recorded for it: 0 to 3 (copy in, convolution, copy out); at 3 its fence decides.
    pub(super) phases: usize,
    /// What passes when its output has been copied out: the fence after that step, or (CUDA
    /// copies) the copy's own end.
    pub(super) fence: Option<Marker>,
    /// The steps that ran its phases.
    pub(super) steps: [Option<Rc<StepTimes>>; 3],
    /// Steps whose GPU time counts as its busy time (each step counts for the oldest job in it).
    pub(super) charged: Vec<Rc<StepTimes>>,
    pub(super) begun: Instant,
    pub(super) done: StreamDone,
}

impl Flight {
    /// Back to before its first step, to run again (after a wrong guess at its weights); its
    /// deadline still counts from its first start.
    pub(super) fn rewind(&mut self) {
        self.phases = 0;
        self.fence = None;
        self.steps = [None, None, None];
        self.done.reruns += 1;
    }

    /// Floats of its output, all parts.
    pub(super) fn out_len(&self) -> usize {
        self.plan.out_len * self.parts
    }

    /// The float ranges of its parts in its input buffer (the last one takes the vec4 padding).
    pub(super) fn input_parts(&self) -> Vec<Range<usize>> {
        let len = self.job.x.len();
        part_ranges(len / self.parts, self.parts, padded(len))
    }

    /// The float ranges of its parts in its output buffer, as `input_parts`.
    pub(super) fn output_parts(&self) -> Vec<Range<usize>> {
        part_ranges(self.plan.out_len, self.parts, padded(self.out_len()))
    }
}

/// `parts` ranges of `part` floats in a buffer of `len` floats, the last running to `len`.
fn part_ranges(part: usize, parts: usize, len: usize) -> Vec<Range<usize>> {
    (0..parts)
        .map(|i| i * part..if i + 1 == parts { len } else { (i + 1) * part })
        .collect()
}

/// A step's timer queries: timestamps before and after its GL work, and its elapsed time;
/// with CUDA copies, the copies in and out as well, each timed by its own events.
pub(super) struct StepTimes {
    pub(super) start: TimerQuery,
    /// The GPU time of its GL work: one query, or with CUDA copies, one per part of its
    /// convolution (not counting the time between parts, when the GPU may wait for the host).
    pub(super) elapsed: Vec<TimerQuery>,
    pub(super) end: TimerQuery,
    /// The fence after its GL work.
    pub(super) fence: Rc<Fence>,
    /// With CUDA copies and a convolution in parts: the fence after each part.
    pub(super) conv_parts: Vec<Rc<Fence>>,
    pub(super) copy_in: Option<TimedCopy>,
    pub(super) copy_out: Option<TimedCopy>,
    /// A job's three phases in this one step, each timed by its own query in `elapsed`
    /// ([`Encoder::encode_alone`]).
    pub(super) alone: bool,
}

/// A step's GL work as it is encoded ([`Encoder::encode_step`], [`Encoder::encode_alone`]): see
/// [`StepTimes`].
#[derive(Default)]
pub(super) struct GlWork {
    pub(super) elapsed: Vec<TimerQuery>,
    pub(super) conv_parts: Vec<Rc<Fence>>,
}

impl StepTimes {
    /// The GPU time of the step (ns): its GL work, or its longest part when CUDA copies ran
    /// beside it.
    pub(super) fn gpu_ns(&self) -> u64 {
        let copy = |phase| self.copy(phase).and_then(TimedCopy::nanoseconds);
        (self.gl_ns())
            .max(copy(0).unwrap_or(0))
            .max(copy(2).unwrap_or(0))
    }

    /// The GPU time (ns) of its GL work.
    fn gl_ns(&self) -> u64 {
        self.elapsed.iter().map(TimerQuery::nanoseconds).sum()
    }

    /// The CUDA copy that ran phase `phase` (0: copy in, 1: convolution, 2: copy out) of a job
    /// in this step, if CUDA copied.
    pub(super) fn copy(&self, phase: usize) -> Option<&TimedCopy> {
        match phase {
            0 => self.copy_in.as_ref(),
            2 => self.copy_out.as_ref(),
            _ => None,
        }
    }

    /// The GPU time (ns) of phase `phase` of a job in this step: a CUDA copy's own time, else
    /// the step's GL time.
    pub(super) fn phase_ns(&self, phase: usize) -> Option<u64> {
        if self.alone {
            return self.elapsed.get(phase).map(TimerQuery::nanoseconds);
        }
        self.copy(phase)
            .map_or_else(|| Some(self.gl_ns()), TimedCopy::nanoseconds)
    }

    /// What passes when phase `phase` of a job in this step has finished on the GPU: a CUDA
    /// copy's end, else the step's fence.
    pub(super) fn phase_end(&self, phase: usize) -> Marker {
        self.copy(phase).map_or_else(
            || Marker::Fence(Rc::clone(&self.fence)),
            |c| Marker::Event(Rc::clone(&c.end)),
        )
    }

    /// What passes when part `part` of phase `phase` of a job in this step has finished: a
    /// CUDA copy's part, a convolution part's fence, else as `phase_end`.
    pub(super) fn part_end(&self, phase: usize, part: usize) -> Marker {
        if let Some(c) = self.copy(phase) {
            return Marker::Event(Rc::clone(c.part_end(part)));
        }
        match self.conv_parts.get(part).filter(|_| phase == 1) {
            Some(fence) => Marker::Fence(Rc::clone(fence)),
            None => self.phase_end(phase),
        }
    }
}

/// A point in the GPU's work that the worker waits for: a GL fence, or a CUDA copy's end.
pub(super) enum Marker {
    Fence(Rc<Fence>),
    Event(Rc<super::cu::Event>),
}

impl Marker {
    /// Whether it has passed.
    pub(super) fn signaled(&self) -> Result<bool> {
        match self {
            Marker::Fence(f) => f.signaled(),
            Marker::Event(e) => e.passed(),
        }
    }

    /// Waits for it to pass by `timeout` after `begun` (a job's submission to the GPU);
    /// whether it had passed already when asked, and an error if it did not pass in time.
    pub(super) fn wait_by_deadline(&self, begun: Instant, timeout: Duration) -> (bool, Result<()>) {
        let already = self.signaled().unwrap_or(false);
        let left = timeout.saturating_sub(begun.elapsed());
        // The deadline counts from the submission to the GPU: a fence that passed, but only
        // after it, fails the job too (as observed here; only a tiny timeout can see that).
        let waited = if already {
            let took = begun.elapsed();
            if took > timeout {
                Err(Error::FenceTimeout(format!(
                    "the fence passed only after {took:?}, past the deadline of {timeout:?}"
                )))
            } else {
                Ok(())
            }
        } else if left.is_zero() {
            // The deadline has passed and the fence had not: polling again now could see it
            // pass late and accept it (seen on the H100 with a 1 ns deadline).
            Err(Error::FenceTimeout(format!(
                "the fence had not passed when its deadline did, {timeout:?} after submission"
            )))
        } else {
            self.wait(left)
        };
        (already, waited)
    }

    /// Waits at most `timeout` for it to pass; an error if it did not.
    pub(super) fn wait(&self, timeout: Duration) -> Result<()> {
        match self {
            Marker::Fence(f) => f.wait(timeout),
            Marker::Event(e) => match e.wait(timeout)? {
                true => Ok(()),
                false => Err(Error::FenceTimeout(format!(
                    "a CUDA copy had not finished after {timeout:?}"
                ))),
            },
        }
    }
}

/// A frame's buffer, which a job in flight always has.
pub(super) fn buffer(b: &Option<Buffer>) -> Result<&Buffer> {
    b.as_ref()
        .ok_or_else(|| Error::Gpu("a frame in flight lacks a buffer".into()))
}

/// A frame's input or output buffer, which a job in flight always has.
pub(super) fn device(b: &Option<DeviceMem>) -> Result<&DeviceMem> {
    b.as_ref()
        .ok_or_else(|| Error::Gpu("a frame in flight lacks a buffer".into()))
}

/// A frame's staging buffer, which a job in flight always has.
pub(super) fn mapped(b: &Option<HostMem>) -> Result<&HostMem> {
    b.as_ref()
        .ok_or_else(|| Error::Gpu("a frame in flight lacks its staging".into()))
}

/// `len` floats rounded up to whole vec4s.
pub(super) fn padded(len: usize) -> usize {
    len.div_ceil(4) * 4
}

/// The pinned inputs a worker has made: mapped buffers by id, freed when their last holder sends
/// the id back.
pub(super) struct PinnedInputs {
    buffers: HashMap<u64, HostMem>,
    next: u64,
    /// Where the ids of pinned inputs whose last holder has gone arrive.
    unpin: mpsc::Receiver<u64>,
    /// The backend's id, which its pinned inputs carry.
    backend_id: u64,
}

impl PinnedInputs {
    /// None yet, for backend `backend_id`, freed through `unpin`.
    pub(super) fn new(backend_id: u64, unpin: mpsc::Receiver<u64>) -> Self {
        Self {
            buffers: HashMap::new(),
            next: 0,
            unpin,
            backend_id,
        }
    }

    /// A new pinned input of `len` floats (CUDA's pinned memory where CUDA copies, else a
    /// persistently mapped GL buffer): its id and mapping (as an address, to cross threads).
    pub(super) fn pin(
        &mut self,
        gl: &Rc<glow::Context>,
        cuda: Option<&CudaCopies>,
        immutable: bool,
        len: usize,
    ) -> Result<(u64, usize)> {
        if !immutable {
            return Err(Error::Gpu(
                "no persistent mapping without GL_ARB_buffer_storage".into(),
            ));
        }
        let mut buffer = match cuda {
            Some(c) => HostMem::Cuda(c.pinned(padded(len))?),
            None => HostMem::Gl(MappedBuffer::new(gl, padded(len), Direction::Pinned)?),
        };
        let ptr = buffer.as_mut_slice().as_mut_ptr() as usize;
        self.next += 1;
        self.buffers.insert(self.next, buffer);
        Ok((self.next, ptr))
    }

    /// Frees the pinned inputs whose last holder has gone.
    pub(super) fn free_released(&mut self) {
        while let Ok(id) = self.unpin.try_recv() {
            self.buffers.remove(&id);
        }
    }

    /// Pinned inputs still held.
    pub(super) fn len(&self) -> usize {
        self.buffers.len()
    }

    /// The mapped buffer of a pinned input of this worker's (another worker's, or plain host
    /// memory, is copied into staging like any host input).
    pub(super) fn get(&self, x: &StreamInput) -> Option<&HostMem> {
        let (owner, id) = x.gl_id()?;
        (owner == self.backend_id)
            .then(|| self.buffers.get(&id))
            .flatten()
    }
}

/// What a step's recording reads: the frames and the jobs in them, how copies run, the plans
/// and the resident weights. Borrowed from the executor for one step.
pub(super) struct Encoder<'a> {
    pub(super) gl: &'a Rc<glow::Context>,
    pub(super) frames: &'a [Frame],
    /// CUDA's copies, where they run the copies.
    pub(super) cuda: Option<&'a CudaCopies>,
    pub(super) copy_mode: StreamCopy,
    pub(super) pinned: &'a PinnedInputs,
    pub(super) plans: &'a Planner,
    pub(super) weights: &'a ResidentWeights,
}

impl Encoder<'_> {
    /// Starts the CUDA copy of the input of the job in frame `slot` into its device buffer,
    /// part by part.
    pub(super) fn cuda_copy_in(&self, slot: usize) -> Result<TimedCopy> {
        let c = self.cuda.expect("CUDA copies are open");
        let f = &self.frames[slot];
        let parts = self.frames[slot].flight().input_parts();
        c.copy_in(
            self.copy_source(f)?.cuda()?,
            device(&f.input)?.cuda()?,
            &parts,
        )
    }

    /// Starts the CUDA copy of the output of the job in frame `slot` into its download staging,
    /// each part once its convolution has finished.
    pub(super) fn cuda_copy_out(&self, slot: usize) -> Result<TimedCopy> {
        let c = self.cuda.expect("CUDA copies are open");
        let f = &self.frames[slot];
        let parts = self.frames[slot].flight().output_parts();
        c.copy_out(
            device(&f.output)?.cuda()?,
            mapped(&f.download)?.cuda()?,
            &parts,
            |part| self.wait_part(slot, 1, part),
        )
    }

    /// Waits, within the job's deadline, until part `part` of phase `phase` (0: copy in, 1:
    /// convolution) of the job in frame `slot` has finished on the GPU (CUDA copies order the
    /// APIs on the host).
    pub(super) fn wait_part(&self, slot: usize, phase: usize, part: usize) -> Result<()> {
        let f = self.frames[slot].flight();
        let Some(step) = &f.steps[phase] else {
            return Err(Error::Gpu(
                "a phase waited for was never recorded (executor bug)".into(),
            ));
        };
        let marker = step.part_end(phase, part);
        let left = f.job.timeout.saturating_sub(f.begun.elapsed());
        marker
            .wait(left)
            .map_err(|e| past_deadline(e, f.job.timeout))
    }

    /// Encodes the convolution of the job in frame `slot` with resident weights `weights`,
    /// part by part, the copies in `fused` where they run in its dispatch. With `cuda` (CUDA
    /// copies), each part first waits for its input's copy, and is timed and fenced on its own
    /// in it, so that its copy out can start before the next part has run.
    pub(super) fn convolve(
        &self,
        slot: usize,
        weights: Option<usize>,
        fused: Option<&FusedPass<'_>>,
        mut cuda: Option<&mut GlWork>,
    ) -> Result<()> {
        let gl = &self.gl;
        let f = &self.frames[slot];
        let flight = self.frames[slot].flight();
        let wi = weights.ok_or_else(|| Error::Gpu("no resident weights".into()))?;
        let bindings = |part| -> Result<Bindings<'_>> {
            Ok(Bindings {
                input: device(&f.input)?.gl(),
                weights: self.weights.buffer(wi),
                bias: buffer(&f.bias)?,
                output: device(&f.output)?.gl(),
                scratch: [f.scratch[0].as_ref(), f.scratch[1].as_ref()],
                part,
            })
        };
        if flight.parts == 1 && cuda.is_none() {
            return self.plans.encode(&flight.plan, &bindings(None)?, fused);
        }
        if fused.is_some() {
            return Err(Error::Gpu(
                "copies fused into a convolution in parts or beside CUDA's (executor bug)".into(),
            ));
        }
        let parts = flight.input_parts().into_iter().zip(flight.output_parts());
        for (i, (input, output)) in parts.enumerate() {
            let b = bindings((flight.parts > 1).then_some((input, output)))?;
            if i > 0 && flight.plan.passes.len() > 1 {
                // The parts share the plan's intermediates: the next writes what this one read.
                gl::storage_barrier(gl);
            }
            let Some(work) = cuda.as_deref_mut() else {
                self.plans.encode(&flight.plan, &b, None)?;
                continue;
            };
            self.wait_part(slot, 0, i)?;
            let elapsed = TimerQuery::begin(gl)?;
            let encoded = self.plans.encode(&flight.plan, &b, None);
            elapsed.end();
            work.elapsed.push(elapsed);
            encoded?;
            if flight.parts > 1 {
                work.conv_parts.push(Rc::new(Fence::new(gl)?));
                gl::flush(gl);
            }
        }
        Ok(())
    }

    /// Encodes a step's work for the jobs in frames `role` ([copy in, convolve, copy out]),
    /// its timer queries and fences into `work`; `weights` is the convolution's resident
    /// weights. Returns whether the copies ran in the convolution's own dispatch.
    pub(super) fn encode_step(
        &self,
        role: [Option<usize>; 3],
        weights: Option<usize>,
        work: &mut GlWork,
    ) -> Result<bool> {
        if self.cuda.is_some() {
            // CUDA copies: the step's GL work is the convolution alone, timed part by part.
            if let Some(slot) = role[1] {
                self.convolve(slot, weights, None, Some(work))?;
            }
            return Ok(false);
        }
        let elapsed = TimerQuery::begin(self.gl)?;
        let encoded = self.encode_copies_and_convolution(role, weights);
        elapsed.end();
        work.elapsed.push(elapsed);
        encoded
    }

    /// Without CUDA copies, a job that runs alone: encodes its copy in, its convolution and its
    /// copy out one after another in this one step, each behind a barrier and timed by its own
    /// query, so that a synchronous call costs one submission and one fence.
    pub(super) fn encode_alone(
        &self,
        slot: usize,
        weights: Option<usize>,
        work: &mut GlWork,
    ) -> Result<()> {
        let gl = &self.gl;
        let f = &self.frames[slot];
        let (x_len, out_len) = (
            padded(self.frames[slot].flight().job.x.len()),
            padded(self.frames[slot].flight().out_len()),
        );
        let (source, input) = (self.copy_source(f)?.gl()?, device(&f.input)?.gl());
        let (output, download) = (device(&f.output)?.gl(), mapped(&f.download)?.gl()?);
        let timed = |work: &mut GlWork, encode: &dyn Fn() -> Result<()>| -> Result<()> {
            let elapsed = TimerQuery::begin(gl)?;
            let encoded = encode();
            elapsed.end();
            work.elapsed.push(elapsed);
            encoded
        };
        match self.copy_mode {
            StreamCopy::Shader { groups } => {
                let copy = self.plans.compiled(shaders::stream_copy_source())?;
                timed(work, &|| {
                    // Bindings 6 and 7 take the partners (the copy out is empty).
                    source.bind(4);
                    input.bind(5);
                    input.bind(6);
                    source.bind(7);
                    copy.dispatch_with([groups, 1, 1], "copies", [groups, 0, (x_len / 4) as u32, 0])
                })?;
                gl::storage_barrier(gl);
                timed(work, &|| self.convolve(slot, weights, None, None))?;
                gl::storage_barrier(gl);
                timed(work, &|| {
                    download.bind(4);
                    output.bind(5);
                    output.bind(6);
                    download.bind(7);
                    copy.dispatch_with(
                        [groups, 1, 1],
                        "copies",
                        [0, groups, 0, (out_len / 4) as u32],
                    )
                })
            }
            _ => {
                timed(work, &|| {
                    gl::copy_buffer(gl, source.raw(), input.raw(), x_len)
                })?;
                timed(work, &|| self.convolve(slot, weights, None, None))?;
                gl::storage_barrier(gl);
                timed(work, &|| {
                    gl::copy_buffer(gl, output.raw(), download.raw(), out_len)
                })
            }
        }
    }

    /// Without CUDA copies: encodes a step's copies (DMA, or shader copies fused into the
    /// convolution's dispatch where its plan allows) and its convolution; whether they were
    /// fused.
    pub(super) fn encode_copies_and_convolution(
        &self,
        role: [Option<usize>; 3],
        weights: Option<usize>,
    ) -> Result<bool> {
        let gl = &self.gl;
        let frame = |slot: Option<usize>| slot.map(|s| &self.frames[s]);
        let (f_in, f_out) = (frame(role[0]), frame(role[2]));
        let x_len = role[0].map_or(0, |s| padded(self.frames[s].flight().job.x.len()));
        let out_len = role[2].map_or(0, |s| padded(self.frames[s].flight().out_len()));
        // Where the newest job's input is: its pinned buffer, or its frame's upload staging.
        let source = |f| self.copy_source(f).and_then(HostMem::gl);
        let StreamCopy::Shader { groups } = self.copy_mode else {
            // DMA copies: one context runs them one after another with the convolution.
            if let Some(f) = f_in {
                gl::copy_buffer(gl, source(f)?.raw(), device(&f.input)?.gl().raw(), x_len)?;
            }
            if let Some(slot) = role[1] {
                self.convolve(slot, weights, None, None)?;
            }
            if let Some(f) = f_out {
                gl::copy_buffer(
                    gl,
                    device(&f.output)?.gl().raw(),
                    mapped(&f.download)?.gl()?.raw(),
                    out_len,
                )?;
            }
            return Ok(false);
        };
        // Copy buffers on bindings 4 to 7; an absent copy binds its partner (nothing reads it).
        if let Some(f) = f_in {
            source(f)?.bind(4);
            device(&f.input)?.gl().bind(5);
        }
        if let Some(f) = f_out {
            device(&f.output)?.gl().bind(6);
            mapped(&f.download)?.gl()?.bind(7);
        }
        match (f_in, f_out) {
            (Some(f), None) => {
                device(&f.input)?.gl().bind(6);
                source(f)?.bind(7);
            }
            (None, Some(f)) => {
                mapped(&f.download)?.gl()?.bind(4);
                device(&f.output)?.gl().bind(5);
            }
            _ => {}
        }
        // Copying workgroups split by bytes, at least one for each copy.
        let (n_in, n_out) = ((x_len / 4) as u64, (out_len / 4) as u64);
        let copy_groups = match (n_in, n_out) {
            (0, 0) => [0, 0],
            (_, 0) => [groups, 0],
            (0, _) => [0, groups],
            _ => {
                let g_in =
                    (u64::from(groups) * n_in / (n_in + n_out)).clamp(1, u64::from(groups) - 1);
                [g_in as u32, groups - g_in as u32]
            }
        };
        let copies = [copy_groups[0], copy_groups[1], n_in as u32, n_out as u32];
        let copying = n_in + n_out > 0;
        // The copies go into the convolution's dispatch where its plan allows, else alongside.
        let fused = role[1]
            .and_then(|s| self.frames[s].flight().fused.as_ref())
            .filter(|_| copying)
            .map(|(source, copy_z)| FusedPass {
                source,
                copy_z: *copy_z,
                copies,
            });
        if copying && fused.is_none() {
            self.plans
                .compiled(shaders::stream_copy_source())?
                .dispatch_with([groups, 1, 1], "copies", copies)?;
        }
        if let Some(slot) = role[1] {
            self.convolve(slot, weights, fused.as_ref(), None)?;
        }
        Ok(fused.is_some())
    }

    /// Where the input of `f`'s job is: its pinned buffer, or the frame's upload staging.
    pub(super) fn copy_source<'a>(&'a self, f: &'a Frame) -> Result<&'a HostMem> {
        match f.flight.as_ref().and_then(|j| self.pinned.get(&j.job.x)) {
            Some(b) => Ok(b),
            None => mapped(&f.upload),
        }
    }
}

/// The GPU times of a finished job from the steps that ran its phases: each phase's time, its
/// busy time (at most the steps charged to it) and its GPU span, CUDA-copied spans read on
/// `clock`.
pub(super) fn gpu_times(
    done: &mut StreamDone,
    steps: &[Option<Rc<StepTimes>>; 3],
    charged: &[Rc<StepTimes>],
    clock: &mut CudaClock,
) {
    let [up, conv, down] = [0, 1, 2].map(|p| steps[p].as_ref().and_then(|s| s.phase_ns(p)));
    (done.upload_ns, done.kernel_ns, done.download_ns) = (up, conv, down);
    // Timer queries say how long the GPU worked; never more than the wall share.
    let timed = charged.iter().map(|s| s.gpu_ns()).sum::<u64>() as f64 * 1e-9;
    done.busy_s = done.busy_s.min(timed);
    if let (Some(first), Some(last)) = (&steps[0], &steps[2]) {
        done.gpu_span_ns = match (&first.copy_in, &last.copy_out) {
            // GL timestamps span its GPU work where GL ran all of it.
            (None, None) => Some((first.start.nanoseconds(), last.end.nanoseconds())),
            (Some(copy_in), Some(copy_out)) => clock.span(copy_in, copy_out),
            _ => None,
        };
    }
}

/// The executor's CUDA clock: the copy-in start event of the last job finished with CUDA
/// copies, and its time (ns) on that clock.
#[derive(Default)]
pub(super) struct CudaClock(Option<(Rc<Event>, i64)>);

impl CudaClock {
    /// The GPU span (ns) of a job whose copies CUDA ran, from the start of `copy_in` to the end
    /// of `copy_out`; moves the clock on to this job. CUDA times events only relative to each
    /// other, so the clock is chained from job to job (jobs finish in order, and copies in run
    /// in order on one stream): each link is short, so precise, and the error of a long one (an
    /// idle gap) shifts every later job alike.
    fn span(&mut self, copy_in: &TimedCopy, copy_out: &TimedCopy) -> Option<(u64, u64)> {
        let start = match &self.0 {
            Some((previous, at)) => at + elapsed_ns(previous, &copy_in.start)?.max(0),
            None => 0,
        };
        let end = start + elapsed_ns(&copy_in.start, &copy_out.end)?.max(0);
        self.0 = Some((Rc::clone(&copy_in.start), start));
        Some((start as u64, end as u64))
    }
}
