//! The CPU backend's threads: the calling thread and `threads − 1` pool workers, and the one
//! way a call's tasks are shared among them ([`Team::spread`]).
//!
//! The caller works instead of sleeping: a call on a pool the caller only waits for pays a wake
//! to start it and another to return, and on the development machine (2 vCPUs) that was 66 µs
//! a call on one thread and 17 µs on two, for a layer whose arithmetic takes 1 µs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::lock;
use crate::error::{Error, Result};

/// How long a caller that has run out of tasks spins on the workers still computing before it
/// sleeps until they end. A sleeping thread's wake is slow on a virtual machine: a tiny layer's
/// two-thread call took 138 µs without the spin and 11 µs with it (development machine); 1 ms
/// instead of 50 µs changed nothing on 0.1-0.2 ms layers.
const SPIN: Duration = Duration::from_micros(50);

/// The calling thread (slot 0) and the pool's workers (slots `1..threads`).
pub(super) struct Team {
    /// `None` for one thread, otherwise `Some` until drop.
    workers: Option<rayon::ThreadPool>,
    /// Workers still running: drop waits for them, so nothing outlives the backend.
    running: Arc<(Mutex<usize>, Condvar)>,
    threads: usize,
}

/// Where a participant takes its next task from.
enum Source<T> {
    /// Each slot its own share, in order (tasks of equal cost, a whole number a thread).
    Shares(Vec<Mutex<std::vec::IntoIter<T>>>),
    /// One queue, in order, for whoever is free.
    Queue(Mutex<std::vec::IntoIter<T>>),
}

impl<T> Source<T> {
    fn next(&self, slot: usize) -> Option<T> {
        match self {
            Source::Shares(shares) => lock(&shares[slot]).next(),
            Source::Queue(queue) => lock(queue).next(),
        }
    }
}

impl Team {
    /// A team of `threads ≥ 1` threads: the caller and `threads − 1` workers named
    /// `sporkle-cpu-1..`.
    pub fn new(threads: usize) -> Result<Self> {
        if threads == 0 {
            return Err(Error::Cpu("thread count must be at least 1".into()));
        }
        let running = Arc::new((Mutex::new(threads - 1), Condvar::new()));
        let workers = if threads == 1 {
            None
        } else {
            let exits = Arc::clone(&running);
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads - 1)
                .thread_name(|i| format!("sporkle-cpu-{}", i + 1))
                .exit_handler(move |_| {
                    let (count, done) = &*exits;
                    *lock(count) -= 1;
                    done.notify_all();
                })
                .build()
                .map_err(|e| Error::Cpu(format!("cannot start {threads} threads: {e}")))?;
            Some(pool)
        };
        Ok(Self {
            workers,
            running,
            threads,
        })
    }

    /// Threads in the team, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs every task of `tasks`, `run(state, slot, task)`, on the caller and the workers,
    /// and returns when all have run. `slot < threads` is the running thread's own (no two
    /// threads share one during the call: index per-thread scratch with it), and `state` is
    /// made by `init` once per thread that runs tasks. A few tasks of equal cost (`even`), a
    /// whole number a thread: each thread runs its own share (handed out on demand, a thread
    /// that woke late had its share taken by another: stem n1's two tasks ran on one thread in
    /// 18% of calls, Zen 4, 2 threads). Otherwise each takes the next task while any are left.
    /// Which thread runs a task changes no bits.
    pub fn spread<T: Send, S>(
        &self,
        tasks: Vec<T>,
        even: bool,
        init: impl Fn() -> S + Sync,
        run: impl Fn(&mut S, usize, T) + Sync,
    ) {
        let workers = match &self.workers {
            Some(pool) if tasks.len() > 1 => pool,
            _ => {
                // One thread, or one task: the caller alone, no wake at all.
                let mut state = init();
                tasks.into_iter().for_each(|task| run(&mut state, 0, task));
                return;
            }
        };
        let threads = self.threads;
        let source = if even && tasks.len().is_multiple_of(threads) && tasks.len() < 4 * threads {
            let per = tasks.len() / threads;
            let mut tasks = tasks.into_iter();
            Source::Shares(
                (0..threads)
                    .map(|_| Mutex::new(tasks.by_ref().take(per).collect::<Vec<_>>().into_iter()))
                    .collect(),
            )
        } else {
            Source::Queue(Mutex::new(tasks.into_iter()))
        };
        let finished = AtomicUsize::new(0);
        let take_part = |slot: usize| {
            if let Some(first) = source.next(slot) {
                let mut state = init();
                run(&mut state, slot, first);
                while let Some(task) = source.next(slot) {
                    run(&mut state, slot, task);
                }
            }
        };
        workers.in_place_scope(|scope| {
            scope.spawn_broadcast(|_, ctx| {
                take_part(ctx.index() + 1);
                finished.fetch_add(1, Ordering::Release);
            });
            take_part(0);
            // The workers are finishing their last tasks: wait awake for a while, so that the
            // scope's end finds them done instead of putting this thread to sleep.
            let start = Instant::now();
            while finished.load(Ordering::Acquire) < threads - 1 && start.elapsed() < SPIN {
                std::hint::spin_loop();
            }
        });
    }
}

impl Drop for Team {
    /// Ends the pool and waits (up to ten seconds, never forever) until its threads have
    /// exited, so that a dropped backend leaves no thread and no allocation behind.
    fn drop(&mut self) {
        drop(self.workers.take());
        let (count, done) = &*self.running;
        let guard = lock(count);
        let (left, _) = done
            .wait_timeout_while(guard, Duration::from_secs(10), |n| *n > 0)
            .unwrap_or_else(|e| e.into_inner());
        debug_assert_eq!(*left, 0, "CPU pool threads still running after drop");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::thread;

    /// Every task runs exactly once, on a slot below the thread count, for every split.
    #[test]
    fn every_task_runs_once() {
        for threads in 1..=4 {
            let team = Team::new(threads).unwrap();
            for n in [0, 1, 2, 3, 4, 7, 8, 64] {
                for even in [false, true] {
                    let runs: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    team.spread(
                        (0..n).collect(),
                        even,
                        || (),
                        |(), slot, i: usize| {
                            assert!(slot < threads, "slot {slot} of {threads} threads");
                            runs[i].fetch_add(1, Ordering::Relaxed);
                        },
                    );
                    for (i, r) in runs.iter().enumerate() {
                        let r = r.load(Ordering::Relaxed);
                        assert_eq!(r, 1, "task {i} of {n} ran {r} times ({threads} threads)");
                    }
                }
            }
        }
    }

    /// No two threads hold one slot at once (callers index per-thread scratch with it), and
    /// `init` runs once per thread that takes tasks, not once per task.
    #[test]
    fn slots_are_exclusive_and_state_per_thread() {
        let team = Team::new(3).unwrap();
        let busy: Vec<AtomicBool> = (0..3).map(|_| AtomicBool::new(false)).collect();
        let inits = AtomicUsize::new(0);
        let runs = AtomicUsize::new(0);
        team.spread(
            (0..60).collect(),
            false,
            || {
                inits.fetch_add(1, Ordering::Relaxed);
                Vec::new()
            },
            |mine: &mut Vec<usize>, slot, i: usize| {
                assert!(
                    !busy[slot].swap(true, Ordering::AcqRel),
                    "slot {slot} taken twice"
                );
                mine.push(i);
                thread::sleep(Duration::from_micros(200));
                busy[slot].store(false, Ordering::Release);
                runs.fetch_add(1, Ordering::Relaxed);
            },
        );
        assert_eq!(runs.load(Ordering::Relaxed), 60);
        let inits = inits.load(Ordering::Relaxed);
        assert!(
            (1..=3).contains(&inits),
            "init ran {inits} times for 3 threads"
        );
    }

    /// Even shares: each slot runs its own consecutive tasks, in order, and slot 0 is the
    /// calling thread (it works instead of waiting).
    #[test]
    fn even_shares_run_on_their_own_slot_and_the_caller_works() {
        let team = Team::new(2).unwrap();
        let caller = thread::current().id();
        let seen = Mutex::new(Vec::new());
        team.spread(
            (0..4).collect(),
            true,
            || (),
            |(), slot, i: usize| {
                let on_caller = thread::current().id() == caller;
                lock(&seen).push((i, slot, on_caller));
            },
        );
        let mut seen = seen.into_inner().unwrap();
        let order: Vec<usize> = seen.iter().filter(|s| s.1 == 0).map(|s| s.0).collect();
        assert_eq!(order, [0, 1], "slot 0's share, in order");
        seen.sort();
        assert_eq!(
            seen,
            [(0, 0, true), (1, 0, true), (2, 1, false), (3, 1, false)]
        );
    }

    /// A dropped team leaves no worker behind; no thread count of zero.
    #[test]
    fn drop_ends_the_workers_and_zero_threads_is_an_error() {
        let team = Team::new(4).unwrap();
        let running = Arc::clone(&team.running);
        assert_eq!(*lock(&running.0), 3, "three workers beside the caller");
        drop(team);
        assert_eq!(*lock(&running.0), 0);
        let err = Team::new(0).err().expect("zero threads must be refused");
        assert!(err.to_string().contains("at least 1"), "{err}");
    }
}
