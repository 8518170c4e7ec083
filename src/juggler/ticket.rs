//! Tickets: a submitted job's handle, which waits for the GPU's answer or re-runs the job on
//! the CPU when the GPU failed.

use super::{DeviceKind, GpuCall, Inner, RunInfo, Stages};
use crate::error::{Error, Result};
use crate::gpu::{Output, StreamDone};
use crate::params::Conv2dParams;
use crate::pinned::StreamInput;
use std::sync::{mpsc, Arc};
use std::time::Instant;

/// A submitted job; [`Ticket::wait`] gives its output.
pub struct Ticket {
    state: TicketState,
}

enum TicketState {
    Done(Box<Result<(Vec<f32>, RunInfo)>>),
    Gpu(Box<GpuTicket>),
}

struct GpuTicket {
    inner: Arc<Inner>,
    answer: mpsc::Receiver<Result<StreamDone>>,
    p: Conv2dParams,
    input: StreamInput,
    weights: Arc<[f32]>,
    bias: Option<Arc<[f32]>>,
    /// See [`GpuCall::host_in_s`].
    host_in_s: f64,
    reason: String,
    submitted: Instant,
    sync: bool,
}

impl Ticket {
    /// The output (`n×c_out×ho×wo`) and what happened. A GPU failure is not an error here: the
    /// job is re-run on the CPU and `RunInfo::fallback` says why.
    pub fn wait(self) -> Result<(Vec<f32>, RunInfo)> {
        match self.state {
            TicketState::Done(r) => *r,
            TicketState::Gpu(t) => t.finish(Output::into_vec),
        }
    }

    /// [`Ticket::wait`] without a copy: `read` sees the output where it is (a GPU output in the
    /// frame's staging buffer, host memory; the frame is lent until `read` returns).
    pub fn wait_with<T>(self, read: impl FnOnce(&[f32]) -> T) -> Result<(T, RunInfo)> {
        match self.state {
            TicketState::Done(r) => {
                let (y, info) = (*r)?;
                Ok((read(&y), info))
            }
            TicketState::Gpu(t) => t.finish(|o| read(o.as_slice())),
        }
    }

    /// [`Ticket::wait`] into the caller's buffer (which must hold exactly the output): for
    /// streams, where reusing buffers saves the page faults of fresh memory. A GPU output goes
    /// straight from the staging buffer into `output`, copied by this thread.
    pub fn wait_into(self, output: &mut [f32]) -> Result<RunInfo> {
        let check = |len: usize| {
            if len == output.len() {
                Ok(())
            } else {
                Err(Error::BufferLength {
                    what: "output",
                    got: output.len() as u64,
                    expected: len as u64,
                })
            }
        };
        match self.state {
            TicketState::Done(r) => {
                let (y, info) = (*r)?;
                check(y.len())?;
                output.copy_from_slice(&y);
                Ok(info)
            }
            TicketState::Gpu(t) => {
                check(t.p.output_len())?;
                t.finish(|o| o.copy_to(output)).map(|((), info)| info)
            }
        }
    }
}

impl GpuTicket {
    /// Waits for the GPU's answer and hands the output to `deliver` (in this thread); on a GPU
    /// failure, re-runs the job on the CPU and delivers that.
    fn finish<T>(self, deliver: impl FnOnce(Output) -> T) -> Result<(T, RunInfo)> {
        // A synchronous call's caller has nothing else to do: it polls for about as long as
        // the shape's calls take (see `answer_spin`); an async one's wait is hidden by others.
        let expected = if self.sync {
            self.inner.expected_gpu_wait(&self.p)
        } else {
            None
        };
        let spin = crate::gpu::answer_spin(expected);
        let answer = crate::gpu::recv_within(&self.answer, spin)
            .unwrap_or_else(|_| Err(Error::Gpu("the GPU stopped before answering".into())));
        let received = Instant::now();
        match answer {
            Ok(mut done) => {
                done.host_in_s += self.host_in_s;
                let output = std::mem::take(&mut done.output);
                let t = Instant::now();
                let delivered = deliver(output);
                let host_out_s = t.elapsed().as_secs_f64();
                let wall_s = self.submitted.elapsed().as_secs_f64();
                self.inner
                    .record_gpu(&self.p, wall_s, &done, host_out_s, self.sync);
                let info = RunInfo {
                    device: DeviceKind::Gpu,
                    reason: self.reason,
                    wall_s,
                    // A step shared with other jobs does not time the convolution alone.
                    gpu_kernel_s: done
                        .kernel_ns
                        .filter(|_| !done.steps_shared)
                        .map(|ns| ns as f64 * 1e-9),
                    gflops: self.p.flops() as f64 / wall_s / 1e9,
                    fallback: None,
                    stages: Some(Stages {
                        host_in_s: done.host_in_s,
                        upload_s: done.upload_ns.map(|ns| ns as f64 * 1e-9),
                        kernel_s: done.kernel_ns.map(|ns| ns as f64 * 1e-9),
                        download_s: done.download_ns.map(|ns| ns as f64 * 1e-9),
                        host_out_s,
                        in_flight: done.in_flight,
                        parts: done.parts,
                        gpu_span_ns: done.gpu_span_ns,
                        queued_s: done.queued_s,
                        gpu_wall_s: done.gpu_wall_s,
                        settle_s: done.settle_s,
                        wake_s: done
                            .answered
                            .map_or(0.0, |a| received.duration_since(a).as_secs_f64()),
                        steps_shared: done.steps_shared,
                        fused: done.fused,
                        cuda_copies: done.cuda_copies,
                        reruns: done.reruns,
                    }),
                };
                Ok((delivered, info))
            }
            Err(e) => {
                let why = e.to_string();
                self.inner.gpu_failed(&e);
                let mut output = crate::host_mem::zeroed(self.p.output_len(), "the output")?;
                let mut info = self.inner.run_cpu(
                    &self.p,
                    self.input.as_slice(),
                    &self.weights,
                    self.bias.as_deref(),
                    &mut output,
                    format!("re-run on the CPU after a GPU failure ({})", self.reason),
                )?;
                info.wall_s = self.submitted.elapsed().as_secs_f64();
                info.fallback = Some(why);
                Ok((deliver(Output::Owned(output)), info))
            }
        }
    }
}

impl Ticket {
    /// A job already finished (on the CPU): its output and what happened.
    pub(super) fn done(output: Vec<f32>, info: RunInfo) -> Self {
        Ticket {
            state: TicketState::Done(Box::new(Ok((output, info)))),
        }
    }

    /// A job sent to the GPU, answered on `answer`; `job` keeps its data for a CPU re-run.
    pub(super) fn gpu(
        inner: &Arc<Inner>,
        p: &Conv2dParams,
        job: GpuCall,
        reason: String,
        answer: mpsc::Receiver<Result<StreamDone>>,
        submitted: Instant,
        sync: bool,
    ) -> Self {
        Ticket {
            state: TicketState::Gpu(Box::new(GpuTicket {
                inner: Arc::clone(inner),
                answer,
                p: *p,
                input: job.input,
                weights: job.weights.data,
                bias: job.bias,
                host_in_s: job.host_in_s,
                reason,
                submitted,
                sync,
            })),
        }
    }
}
