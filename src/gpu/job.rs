//! Streaming jobs: what a caller sends the executor (a [`StreamJob`]) and what comes back (a
//! [`StreamDone`], its output in a frame's staging as long as the caller reads it).

use super::gl::MappedView;
use super::host_copy::{copy_from_staging, parallel_copy};
use super::resident::SharedWeights;
use crate::error::{Error, Result};
use crate::params::Conv2dParams;
use crate::pinned::{PinnedShared, StreamInput};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// A streaming job.
pub(crate) struct StreamJob {
    pub(super) p: Conv2dParams,
    pub(super) x: StreamInput,
    pub(super) w: JobWeights,
    pub(super) b: Option<Arc<[f32]>>,
    /// False: the job runs alone (synchronous mode), with no other frame in flight.
    pub(super) pipelined: bool,
    /// How long its fence may take, from submission to the GPU.
    pub(super) timeout: Duration,
    pub(super) reply: mpsc::SyncSender<Result<StreamDone>>,
    /// When it was sent to the worker.
    pub(super) sent: Instant,
}

/// A job's weights: known when it is sent, or sent by the caller later on their own channel
/// (a synchronous call hashes its weights while the GPU copies its input in: the convolution
/// is the first phase that needs them), possibly with a guess to convolve with meanwhile.
pub(crate) enum JobWeights {
    Ready(SharedWeights),
    Later(mpsc::Receiver<SharedWeights>),
    /// Sent later, and meanwhile `guess`: the set the caller's slice held the last time it was
    /// keyed (same address and length). The convolution uses the guess when the true weights
    /// have not arrived by then, or `always` (a test hook: where small weights are hashed
    /// before the convolution starts, the guess would seldom be used); the job is answered only
    /// once they have arrived and their key is the guess's, else it runs again with them
    /// ([`JobWeights::confirm`]). `used`: it was convolved with.
    Guessed {
        guess: SharedWeights,
        later: mpsc::Receiver<SharedWeights>,
        always: bool,
        used: bool,
    },
}

impl JobWeights {
    /// The weights, waiting for the caller to send them if they come later (a guess is never
    /// taken for them).
    pub(super) fn get(&mut self) -> Result<&SharedWeights> {
        if let JobWeights::Later(rx) | JobWeights::Guessed { later: rx, .. } = self {
            let w = recv_soon(rx).map_err(|_| stopped())?;
            *self = JobWeights::Ready(w);
        }
        match self {
            JobWeights::Ready(w) => Ok(w),
            _ => unreachable!("resolved above"),
        }
    }

    /// The weights to convolve with now: the true ones where they have arrived (or come later
    /// without a guess: then waited for), else the guess.
    pub(super) fn for_convolution(&mut self) -> Result<&SharedWeights> {
        if let JobWeights::Guessed {
            later,
            always,
            used,
            ..
        } = self
        {
            match later.try_recv() {
                Ok(w) if !*always => *self = JobWeights::Ready(w),
                Ok(w) => {
                    // Kept for the confirmation, the guess used all the same.
                    let (tx, rx) = mpsc::sync_channel(1);
                    let _ = tx.send(w);
                    *later = rx;
                    *used = true;
                }
                Err(mpsc::TryRecvError::Empty) => *used = true,
                Err(mpsc::TryRecvError::Disconnected) => return Err(stopped()),
            }
        }
        match self {
            JobWeights::Guessed { guess, .. } => Ok(guess),
            _ => self.get(),
        }
    }

    /// Once the job has run: whether it ran with its true weights. A guess used is checked
    /// against the true weights (waited for): the same key confirms it, another leaves the
    /// job with the true weights, to be run again.
    pub(super) fn confirm(&mut self) -> Result<bool> {
        let guessed = match self {
            JobWeights::Guessed {
                guess, used: true, ..
            } => Some(guess.key),
            _ => None,
        };
        let key = self.get()?.key;
        Ok(guessed.is_none_or(|g| g == key))
    }
}

/// The error of a job whose caller stopped before sending its weights.
fn stopped() -> Error {
    Error::Gpu("the caller stopped before sending the job's weights".into())
}

/// The caller's side of pinned input `id` of `len` floats at address `ptr` (from
/// `Executor::pin`), which sends `id` back on `free` when its last holder is gone.
pub(super) fn pinned_shared(
    owner: u64,
    id: u64,
    ptr: usize,
    len: usize,
    free: mpsc::Sender<u64>,
) -> PinnedShared {
    // SAFETY: the worker keeps buffer `id` mapped (persistent mapping of immutable storage) and
    // never writes it; it deletes it only when the id comes back on `free`, which PinnedShared
    // sends when dropped, and at exit leaves the context alive while any is still held.
    unsafe { PinnedShared::mapped(owner, id, ptr as *mut f32, len, free) }
}

/// Answers `job` with `result`, after dropping the job (its hold on a pinned input goes first,
/// so a caller whose ticket has returned can write that input at once).
pub(super) fn answer(job: StreamJob, result: Result<StreamDone>) {
    let reply = job.reply.clone();
    drop(job);
    let _ = reply.send(result);
}

/// How long a thread waiting for a message from another thread (a caller for its answer, the
/// worker for its next job or a job's weights) polls before it sleeps: waking a sleeping thread
/// took 8-20 µs on the H200's host, three times per call, most of a small call's fixed cost,
/// while a small call's own waits are shorter than this. `SPORKLE_SPIN_US` (0: sleep at once);
/// the polling yields, so other runnable threads keep the core.
const SPIN_DEFAULT: Duration = Duration::from_micros(200);

/// The polling window, read once.
fn spin_window() -> Duration {
    static SPIN: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| {
        super::knob::knob("SPORKLE_SPIN_US", |v| match v.parse::<u64>() {
            Ok(us) if us <= 1_000_000 => Ok(Duration::from_micros(us)),
            _ => Err("expected microseconds, 0 to 1000000".into()),
        })
        .unwrap_or(SPIN_DEFAULT)
    })
}

/// The longest a synchronous call's caller polls for its answer ([`answer_spin`]).
const ANSWER_SPIN_MAX: Duration = Duration::from_millis(20);

/// How long the caller of a synchronous GPU call that is expected to take `expected` (its
/// shape's measured wall time) polls for the answer before it sleeps: half as long again as
/// expected, at least the spin window and at most [`ANSWER_SPIN_MAX`] (none with
/// `SPORKLE_SPIN_US=0`). A caller asleep when the answer came took 15-35 µs to wake on the
/// H200's host (vgg n32 up to 170), on calls longer than the spin window.
pub(crate) fn answer_spin(expected: Option<Duration>) -> Duration {
    let window = spin_window();
    if window.is_zero() {
        return window;
    }
    let longer = expected.map_or(Duration::ZERO, |e| e.mul_f64(1.5).min(ANSWER_SPIN_MAX));
    window.max(longer)
}

/// `rx.recv()`, polling (and yielding) for the spin window before it sleeps.
pub(crate) fn recv_soon<T>(rx: &mpsc::Receiver<T>) -> std::result::Result<T, mpsc::RecvError> {
    recv_within(rx, spin_window())
}

/// `rx.recv()`, polling (and yielding) for `window` before it sleeps.
pub(crate) fn recv_within<T>(
    rx: &mpsc::Receiver<T>,
    window: Duration,
) -> std::result::Result<T, mpsc::RecvError> {
    if !window.is_zero() {
        let start = Instant::now();
        loop {
            match rx.try_recv() {
                Ok(v) => return Ok(v),
                Err(mpsc::TryRecvError::Disconnected) => return Err(mpsc::RecvError),
                Err(mpsc::TryRecvError::Empty) if start.elapsed() < window => {
                    std::thread::yield_now()
                }
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
    }
    rx.recv()
}

/// A job's fence timeout, naming the job's deadline (other errors as they are).
pub(super) fn past_deadline(e: Error, deadline: Duration) -> Error {
    match e {
        Error::FenceTimeout(why) => {
            Error::FenceTimeout(format!("the job's deadline of {deadline:?}: {why}"))
        }
        other => other,
    }
}

/// The error of a job refused or failed because the executor is broken (`why`).
pub(super) fn unhealthy(why: &str) -> Error {
    Error::Gpu(format!("the GPU is unhealthy: {why}"))
}

/// A job's output in its frame's download staging buffer, readable from any thread; dropping it
/// gives the frame back to the executor.
pub struct Staged {
    view: MappedView,
    slot: usize,
    release: mpsc::Sender<usize>,
    /// Copied out in one piece after the convolution (the job ran in one part), so that the
    /// next copy into this staging is all on its job's path ([`copy_from_staging`] may
    /// demote it from the caches as it is read).
    whole: bool,
}

impl Staged {
    /// Output `view` of frame `slot`, whose release goes back on `release` when dropped; `whole`:
    /// its job ran in one part.
    pub(super) fn new(
        view: MappedView,
        slot: usize,
        release: mpsc::Sender<usize>,
        whole: bool,
    ) -> Self {
        Self {
            view,
            slot,
            release,
            whole,
        }
    }

    /// The output, `n×c_out×ho×wo`.
    pub fn as_slice(&self) -> &[f32] {
        self.view.as_slice()
    }

    /// Copies the output into `dst` (in parallel chunks; see [`copy_from_staging`] for a job
    /// that ran whole).
    fn copy_to(&self, dst: &mut [f32]) {
        match self.whole {
            true => copy_from_staging(self.as_slice(), dst),
            false => parallel_copy(self.as_slice(), dst),
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // A closed channel means the worker has gone, which it does only after every release.
        let _ = self.release.send(self.slot);
    }
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Staged {{ slot: {}, len: {} }}",
            self.slot,
            self.as_slice().len()
        )
    }
}

/// Where a finished job's output is.
#[derive(Debug)]
pub enum Output {
    /// In the frame's staging buffer (the executor's path).
    Staged(Staged),
    /// In host memory (the plain path, without `GL_ARB_buffer_storage`).
    Owned(Vec<f32>),
}

impl Default for Output {
    fn default() -> Self {
        Output::Owned(Vec::new())
    }
}

impl Output {
    /// The output, `n×c_out×ho×wo`.
    pub fn as_slice(&self) -> &[f32] {
        match self {
            Output::Staged(s) => s.as_slice(),
            Output::Owned(v) => v,
        }
    }

    /// Copies it into `dst` (in parallel chunks), releasing the frame.
    pub fn copy_to(self, dst: &mut [f32]) {
        match &self {
            Output::Staged(s) => s.copy_to(dst),
            Output::Owned(v) => parallel_copy(v, dst),
        }
    }

    /// The output as a vector (a copy into fresh memory unless it already is one).
    pub fn into_vec(self) -> Vec<f32> {
        match self {
            Output::Owned(v) => v,
            Output::Staged(s) => {
                let mut v = vec![0.0f32; s.as_slice().len()];
                s.copy_to(&mut v);
                v
            }
        }
    }
}

/// A finished streaming job: the output and where the time went.
#[derive(Debug, Default)]
pub struct StreamDone {
    /// The output.
    pub output: Output,
    /// Times it ran again because it had run with a guess at its weights that was wrong (see
    /// the executor's weight guesses); its times are those of its last run.
    pub reruns: u32,
    /// GPU time of the steps that copied its input in, convolved and copied its output out
    /// (timer queries; `None` on a software renderer, whose timers mean nothing): its own times
    /// when it ran alone, those of whole steps when they ran other jobs' phases too
    /// (`steps_shared`).
    pub upload_ns: Option<u64>,
    /// See `upload_ns`.
    pub kernel_ns: Option<u64>,
    /// See `upload_ns`.
    pub download_ns: Option<u64>,
    /// GPU times (ns) at the start of its copy in and the end of its copy out (`None` on a
    /// software renderer): GL timestamps, or with CUDA copies, times of the copies' CUDA events
    /// on a clock chained from job to job (`CudaClock::span`, `step.rs`). Either way, comparable between
    /// the jobs of one executor.
    pub gpu_span_ns: Option<(u64, u64)>,
    /// Wall time of the host copy into staging, on a copy thread (0 for a pinned input; the copy
    /// out happens in the caller's thread).
    pub host_in_s: f64,
    /// Wall time from the frame's submission to its fence passing.
    pub gpu_wall_s: f64,
    /// Wall time from the job's sending to the worker starting it.
    pub queued_s: f64,
    /// Wall time from its fence passing to its answer.
    pub settle_s: f64,
    /// When it was answered.
    pub answered: Option<Instant>,
    /// GPU busy time of this job: the steps charged to it (each step to the oldest job in it), at
    /// most its share of the wall time during which some job was on the GPU (that share alone on
    /// a software renderer), so jobs in flight together are never counted twice.
    pub busy_s: f64,
    /// Whether the executor had to block on the fence, and for how long.
    pub fence_waited: bool,
    /// See `fence_waited`.
    pub fence_wait_s: f64,
    /// Whether its steps ran other jobs' phases too (pipelined): then the upload, kernel and
    /// download times are those of whole steps, not its own.
    pub steps_shared: bool,
    /// Whether its copies ran inside a convolution's dispatch (shader copies, fused).
    pub fused: bool,
    /// Whether CUDA's copy engines moved its input and output (`cu.rs`).
    pub cuda_copies: bool,
    /// Whether the weights had to be uploaded (false: resident).
    pub weights_uploaded: bool,
    /// Jobs in flight when this one was started, itself included (1: it ran alone).
    pub in_flight: usize,
    /// Parts its batch ran in along n (1: whole; see `Planner::parts`).
    pub parts: usize,
    /// Bytes copied host → GPU (input, bias, and weights when uploaded) and GPU → host.
    pub bytes_up: u64,
    /// See `bytes_up`.
    pub bytes_down: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synchronous caller polls for half as long again as its call is expected to take,
    /// within the spin window and the cap; unknown times get the spin window.
    #[test]
    fn answer_spin_follows_the_expected_time_within_bounds() {
        let window = spin_window();
        assert_eq!(answer_spin(None), window);
        if window.is_zero() {
            // SPORKLE_SPIN_US=0: no polling at all, whatever is expected.
            assert_eq!(answer_spin(Some(Duration::from_millis(3))), Duration::ZERO);
            return;
        }
        assert_eq!(answer_spin(Some(Duration::from_micros(1))), window);
        let long = window * 4;
        assert_eq!(answer_spin(Some(long)), long.mul_f64(1.5));
        assert_eq!(
            answer_spin(Some(Duration::from_secs(5))),
            ANSWER_SPIN_MAX.max(window)
        );
    }

    /// Weights sent later are waited for, then kept; a caller that stops before sending them
    /// fails the job with an error, never a hang or a panic.
    #[test]
    fn weights_sent_later_arrive_or_fail_the_job() {
        let (tx, rx) = mpsc::sync_channel(1);
        let mut later = JobWeights::Later(rx);
        let sent = SharedWeights::new(vec![1.0f32, 2.0].into());
        let sender = std::thread::spawn(move || tx.send(sent).unwrap());
        assert_eq!(&*later.get().unwrap().data, &[1.0, 2.0]);
        sender.join().unwrap();
        assert_eq!(
            &*later.get().unwrap().data,
            &[1.0, 2.0],
            "kept once resolved"
        );
        let (tx, rx) = mpsc::sync_channel::<SharedWeights>(1);
        drop(tx);
        assert!(matches!(JobWeights::Later(rx).get(), Err(Error::Gpu(_))));
    }

    /// A guess is convolved with only while the true weights have not arrived, and confirmed
    /// only by the true weights' key; a wrong guess leaves the true weights for the re-run.
    #[test]
    fn a_guess_is_used_only_until_the_weights_arrive_and_then_checked() {
        let a = SharedWeights::new(vec![1.0f32, 2.0].into());
        let b = SharedWeights::new(vec![1.0f32, 2.5].into());
        let guessed = |guess: &SharedWeights| {
            let (tx, rx) = mpsc::sync_channel(1);
            let w = JobWeights::Guessed {
                guess: guess.clone(),
                later: rx,
                always: false,
                used: false,
            };
            (tx, w)
        };
        // Arrived before the convolution: the guess is never used, nothing to confirm.
        let (tx, mut w) = guessed(&a);
        tx.send(b.clone()).unwrap();
        assert_eq!(w.for_convolution().unwrap().key, b.key);
        assert!(w.confirm().unwrap());
        // Used, then the same key arrives: confirmed.
        let (tx, mut w) = guessed(&a);
        assert_eq!(w.for_convolution().unwrap().key, a.key);
        tx.send(a.clone()).unwrap();
        assert!(w.confirm().unwrap());
        // Used, then other weights arrive: not confirmed, and the true ones are kept.
        let (tx, mut w) = guessed(&a);
        assert_eq!(w.for_convolution().unwrap().key, a.key);
        tx.send(b.clone()).unwrap();
        assert!(!w.confirm().unwrap());
        assert_eq!(w.for_convolution().unwrap().key, b.key, "the re-run's");
        assert!(w.confirm().unwrap(), "the re-run ran with its true weights");
        // A caller that stops: an error, never the guess's result.
        let (tx, mut w) = guessed(&a);
        assert_eq!(w.for_convolution().unwrap().key, a.key);
        drop(tx);
        assert!(matches!(w.confirm(), Err(Error::Gpu(_))));
    }
}
