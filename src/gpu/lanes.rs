//! Transfer lanes: DMA copies issued from their own shared GL context on their own thread.
//!
//! Within one context the H100 runs uploads, compute and downloads one after another; in
//! separate shared contexts they overlap (`sporkle probe-overlap`: overlap fractions 0.59–0.71).
//! So the executor can give its uploads to one lane and its downloads to another, and keep only
//! the convolutions in the worker's context. Order between contexts comes from fences: a copy
//! may wait on the GPU (`glWaitSync`) for a fence of another context, and every copy ends with a
//! fence that it hands back ([`SharedFence`]); buffers are shared objects, named by their GL
//! names. Each copy is timed by its own timer query and timestamps (queries are not shared
//! between contexts), and the lane sends those times once the GPU has them, without blocking
//! the copies behind it.

use super::context::SharedContext;
use super::gl::{self, SharedFence, TimerQuery};
use crate::error::{Error, Result};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// One copy's GPU times, in nanoseconds: its duration (`GL_TIME_ELAPSED`) and the GPU clock
/// before and after it (`GL_TIMESTAMP`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CopyTimes {
    pub elapsed: u64,
    pub start: u64,
    pub end: u64,
}

/// A copy issued on a lane.
pub(crate) struct Issued {
    /// Passes once the copy is complete.
    pub done: SharedFence,
    /// Its times, sent once the GPU has them.
    pub times: mpsc::Receiver<CopyTimes>,
}

struct Copy {
    after: Option<SharedFence>,
    from: glow::Buffer,
    to: glow::Buffer,
    floats: usize,
    reply: mpsc::Sender<Result<Issued>>,
}

/// A copy issued, whose times are not read yet.
struct Pending {
    elapsed: TimerQuery,
    start: TimerQuery,
    end: TimerQuery,
    times: mpsc::Sender<CopyTimes>,
}

impl Pending {
    /// Reads the times (waiting for the GPU if need be), deletes the queries, then sends the
    /// times: whoever receives them sees the queries gone.
    fn send(self) {
        let times = CopyTimes {
            elapsed: self.elapsed.nanoseconds(),
            start: self.start.nanoseconds(),
            end: self.end.nanoseconds(),
        };
        let Pending {
            elapsed,
            start,
            end,
            times: tx,
        } = self;
        drop((elapsed, start, end));
        let _ = tx.send(times);
    }
}

/// A thread with its own shared context that issues copies in order.
pub(crate) struct Lane {
    copies: Option<mpsc::Sender<Copy>>,
    thread: Option<JoinHandle<()>>,
}

impl Lane {
    /// Starts a lane in `context` (made current on the lane's thread).
    pub fn start(context: SharedContext, name: &str) -> Result<Self> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (copies, rx) = mpsc::channel::<Copy>();
        let thread = std::thread::Builder::new()
            .name(format!("sporkle-{name}"))
            .spawn(move || match context.make_current() {
                Ok(ctx) => {
                    let _ = ready_tx.send(Ok(()));
                    serve(&ctx.gl, &rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| Error::Gpu(format!("cannot start the {name} lane: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                copies: Some(copies),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(Error::Gpu(format!(
                    "the {name} lane stopped while starting"
                )))
            }
        }
    }

    /// Issues a copy of `floats` floats from buffer `from` to buffer `to` (GL names of the share
    /// group), after the GPU has passed `after` if given; returns once it is submitted.
    pub fn copy(
        &self,
        after: Option<SharedFence>,
        from: glow::Buffer,
        to: glow::Buffer,
        floats: usize,
    ) -> Result<Issued> {
        let (reply, answer) = mpsc::channel();
        let sent = self.copies.as_ref().is_some_and(|c| {
            c.send(Copy {
                after,
                from,
                to,
                floats,
                reply,
            })
            .is_ok()
        });
        if !sent {
            return Err(Error::Gpu("a transfer lane has stopped".into()));
        }
        answer
            .recv()
            .map_err(|_| Error::Gpu("a transfer lane stopped during a copy".into()))?
    }
}

impl Drop for Lane {
    /// Stops the thread once its copies' times are sent; it deletes its objects and context.
    fn drop(&mut self) {
        self.copies.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The lane's loop: issue each copy as it comes, send the times of finished ones in between.
fn serve(gl: &std::rc::Rc<glow::Context>, copies: &mpsc::Receiver<Copy>) {
    let mut pending: Vec<Pending> = Vec::new();
    loop {
        let next = if pending.is_empty() {
            copies
                .recv()
                .map_err(|_| mpsc::RecvTimeoutError::Disconnected)
        } else {
            copies.recv_timeout(Duration::from_micros(100))
        };
        match next {
            Ok(copy) => {
                let reply = copy.reply.clone();
                let _ = reply.send(issue(gl, copy, &mut pending));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let (ready, waiting): (Vec<Pending>, Vec<Pending>) =
            pending.into_iter().partition(|p| p.end.available());
        ready.into_iter().for_each(Pending::send);
        pending = waiting;
    }
    // Reading a result waits for the GPU: every copy is complete before the context goes.
    pending.into_iter().for_each(Pending::send);
}

/// Records one copy between its queries, then a fence, and submits them.
fn issue(
    gl: &std::rc::Rc<glow::Context>,
    copy: Copy,
    pending: &mut Vec<Pending>,
) -> Result<Issued> {
    if let Some(after) = copy.after {
        // Deleting a fence that a glWaitSync still waits on is deferred by GL until it passes.
        after.adopt(gl).gpu_wait();
    }
    let start = TimerQuery::timestamp(gl)?;
    let elapsed = TimerQuery::begin(gl)?;
    let copied = gl::copy_buffer(gl, copy.from, copy.to, copy.floats);
    elapsed.end();
    copied?;
    let end = TimerQuery::timestamp(gl)?;
    let done = gl::Fence::new(gl)?;
    gl::flush(gl);
    let (times, rx) = mpsc::channel();
    pending.push(Pending {
        elapsed,
        start,
        end,
        times,
    });
    Ok(Issued {
        done: done.into_shared(),
        times: rx,
    })
}
