//! Host-side copies between the caller's memory and the streaming staging buffers: large
//! copies are split across threads and written with non-temporal (streaming) stores.
//!
//! A plain copy reads each destination cache line before writing it (read for ownership), so
//! it moves three bytes of memory traffic for every two it copies; streaming stores skip that
//! read and do not evict the caches. On the H100 machine, with the copy into staging of one job
//! and the copy out of another running at once (`bench --stream`, from the caller's memory),
//! this made #7 (25.7 MB each way) 12% faster: 1.60–1.71 ms a batch against 1.84–2.07, three
//! runs each, interleaved. `SPORKLE_COPY_NT=0` keeps plain copies, for comparison.
//!
//! The chunks run on threads kept for the process (a rayon pool), not on threads started for
//! each copy: on a loaded H100 host, starting 8 threads a copy had made async streaming from
//! the caller's memory 2× slower (#7 5.09–5.75 ms a batch against 1.98–2.88, three runs each,
//! interleaved) and no faster than sync on #5.

/// Copies of at least this many floats are split across threads and use streaming stores, by
/// default (2 MiB; not measured against smaller thresholds yet: a synchronous call's 0.8 MB
/// input is copied on one thread at about 10 GB/s on the H200's host, stop 28)...
const PARALLEL_COPY_MIN: usize = 1 << 19;

/// ... or this many (`SPORKLE_COPY_PARALLEL_MIN`, for measuring), read once.
fn parallel_min() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| {
        super::knob::knob("SPORKLE_COPY_PARALLEL_MIN", |v| match v.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err("expected a number of floats, at least 1".into()),
        })
        .unwrap_or(PARALLEL_COPY_MIN)
    })
}

/// Chunks a large copy is split into: at most 8 (`SPORKLE_COPY_THREADS`).
fn chunks() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        std::env::var("SPORKLE_COPY_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map_or(1, usize::from)
                    .min(8)
            })
            .max(1)
    })
}

/// The threads that copy large copies' chunks, made on first use and kept: twice [`chunks`], so
/// that a copy in and a copy out running at once (async streaming) each have a thread per
/// chunk, and no copy waits for threads to start. `None` where they cannot be made (copies then
/// run on the caller's thread alone).
fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(2 * chunks())
            .thread_name(|i| format!("sporkle-copy-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// `dst.copy_from_slice(src)`, split across the copy threads (`chunks`) with streaming stores
/// when large.
pub fn parallel_copy(src: &[f32], dst: &mut [f32]) {
    if src.len() < parallel_min() {
        dst.copy_from_slice(src);
        return;
    }
    split_copy(src, dst);
}

/// [`parallel_copy`] into staging that the GPU reads next: smaller copies too use streaming
/// stores (on this thread), so that the data is in memory, not dirty in this core's cache,
/// when the GPU's copy engine reads it. On the H200's host the CUDA copy of a synchronous
/// call's input took twice as long after plain stores (#1 0.026 against 0.013 ms, #3 0.035
/// against 0.020, stop 29), and plain stores also read every line before writing it.
pub fn copy_to_staging(src: &[f32], dst: &mut [f32]) {
    if src.len() < parallel_min() {
        streaming_copy(src, dst);
        return;
    }
    split_copy(src, dst);
}

/// See [`parallel_copy`]: the copy split across the copy threads, with streaming stores.
fn split_copy(src: &[f32], dst: &mut [f32]) {
    split_with(src, dst, 1, streaming_copy);
}

/// `copy` run on chunks of `src` and `dst` across the copy threads (chunk boundaries at
/// multiples of `align` floats).
fn split_with(src: &[f32], dst: &mut [f32], align: usize, copy: fn(&[f32], &mut [f32])) {
    let Some(pool) = pool() else {
        copy(src, dst);
        return;
    };
    let per = src.len().div_ceil(chunks()).next_multiple_of(align).max(1);
    let mut pairs = dst.chunks_mut(per).zip(src.chunks(per));
    let first = pairs.next();
    // The calling thread copies the first chunk itself: one hand-off to the pool's threads,
    // not two (a scope's body would first go to a pool thread, which then wakes the others).
    pool.in_place_scope(|s| {
        for (d, c) in pairs {
            s.spawn(move |_| copy(c, d));
        }
        if let Some((d, c)) = first {
            copy(c, d);
        }
    });
}

/// [`parallel_copy`] out of the download staging of a job that ran in one part (its copy out
/// all on its path, none of it behind a convolution): where the copy is split across the copy
/// threads and each thread's share fits in its core's L2, each 16 KiB block is demoted to the
/// shared cache after it is read (`CLDEMOTE`, where the CPU has it), so that the next GPU copy
/// into it does not find its lines in a core's private caches. On the H200's host that copy
/// ran 3x slower: stem n1's 3.2 MB 0.20-0.23 ms against 0.062-0.064 demoted, the call 0.445
/// and 0.481 ms against 0.342 and 0.414 (`bench --one-call`, same call). Where it is not: a
/// share larger than the L2 has left it by then; one thread demoting a whole copy doubled it
/// (l1 n1's 0.8 MB: 0.065 -> 0.135 ms); a job in parts copies most of its output out behind
/// its convolution, and demoting cost l2 s2 n8 more than it saved (host copy +0.05 ms, copy
/// out -0.01 to -0.03). `SPORKLE_DEMOTE=0` never demotes, `1` demotes split copies of any
/// share (for measuring); docs/experiments.md.
pub fn copy_from_staging(src: &[f32], dst: &mut [f32]) {
    let split = src.len() >= parallel_min() && pool().is_some();
    let share = std::mem::size_of_val(src) / chunks();
    if split && demote(share) {
        split_with(src, dst, 16, demoting);
    } else {
        parallel_copy(src, dst);
    }
}

/// Whether [`copy_from_staging`] demotes a thread's `share` of bytes (see there).
fn demote(share: usize) -> bool {
    static RULE: std::sync::OnceLock<(bool, Option<bool>, Option<usize>)> =
        std::sync::OnceLock::new();
    let (can, forced, l2) = *RULE.get_or_init(|| {
        let forced = super::knob::knob("SPORKLE_DEMOTE", |v| match v {
            "0" => Ok(false),
            "1" => Ok(true),
            _ => Err("expected 0 or 1".into()),
        });
        (has_cldemote(), forced, l2_bytes())
    });
    can && forced.unwrap_or_else(|| l2.is_some_and(|l2| share <= l2))
}

/// Whether the CPU has `CLDEMOTE` (CPUID leaf 7, ECX bit 25).
fn has_cldemote() -> bool {
    #[cfg(target_arch = "x86_64")]
    return cpuid7().is_some_and(|r| (r.ecx >> 25) & 1 == 1);
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// CPUID leaf 7 (subleaf 0: structured extended features), where the maximum leaf reaches it
/// (for features std's detection does not name).
#[cfg(target_arch = "x86_64")]
fn cpuid7() -> Option<std::arch::x86_64::CpuidResult> {
    use std::arch::x86_64::__cpuid_count;
    (__cpuid_count(0, 0).eax >= 7).then(|| __cpuid_count(7, 0))
}

/// The size of this CPU's L2 (of cpu0, from Linux's sysfs); `None` where it cannot be read.
fn l2_bytes() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.filter_map(|e| e.ok()).find_map(|e| {
        let read = |f: &str| std::fs::read_to_string(e.path().join(f)).ok();
        let unified_or_data = matches!(read("type")?.trim(), "Unified" | "Data");
        if read("level")?.trim() != "2" || !unified_or_data {
            return None;
        }
        parse_cache_size(read("size")?.trim())
    })
}

/// A sysfs cache size (`2048K`, `1M`, `512`) in bytes.
fn parse_cache_size(s: &str) -> Option<usize> {
    let (digits, unit) = match s.strip_suffix(['K', 'M']) {
        Some(d) => (d, if s.ends_with('K') { 1 << 10 } else { 1 << 20 }),
        None => (s, 1),
    };
    digits.parse::<usize>().ok().map(|n| n * unit)
}

/// [`streaming_copy`] of `src` into `dst` in 16 KiB blocks, each block of `src` demoted after
/// it is read.
fn demoting(src: &[f32], dst: &mut [f32]) {
    for (s, d) in src.chunks(4096).zip(dst.chunks_mut(4096)) {
        streaming_copy(s, d);
        lines(s, |line| {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a hint about a line of `s`, memory this thread may read; CLDEMOTE's
            // encoding is a no-op on CPUs without it (and it runs only where `demote` found it).
            unsafe {
                std::arch::asm!("cldemote [{0}]", in(reg) line, options(nostack, preserves_flags))
            };
        });
    }
}

/// [`parallel_copy`] at every size (the copy always split across the threads).
#[cfg(feature = "probes")]
pub fn split_copy_always(src: &[f32], dst: &mut [f32]) {
    split_copy(src, dst);
}

/// `src`'s cache lines flushed from every cache (`CLFLUSHOPT`; `CLFLUSH` without it), split
/// across the copy threads.
#[cfg(feature = "probes")]
pub fn parallel_flush(src: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_clflush, _mm_sfence};
        let mut scratch = vec![0.0f32; src.len()];
        // CPUID leaf 7, EBX bit 23: CLFLUSHOPT.
        let opt = cpuid7().is_some_and(|r| (r.ebx >> 23) & 1 == 1);
        let flush: fn(&[f32], &mut [f32]) = match opt {
            true => |s, _| {
                // SAFETY: flushing lines of `s`, on a CPU with CLFLUSHOPT (checked above), then
                // a fence (SSE, x86-64's baseline) that orders them.
                lines(s, |line| unsafe {
                    std::arch::asm!("clflushopt [{0}]", in(reg) line, options(nostack))
                });
                unsafe { _mm_sfence() };
            },
            // SAFETY: flushing lines of `s`; CLFLUSH is in x86-64's baseline (SSE2).
            false => |s, _| lines(s, |line| unsafe { _mm_clflush(line) }),
        };
        split_with(src, &mut scratch, 16, flush);
    }
}

/// `f` on an address in each 64-byte line of `s`.
fn lines(s: &[f32], f: impl Fn(*const u8)) {
    let p = s.as_ptr().cast::<u8>();
    for off in (0..std::mem::size_of_val(s)).step_by(64) {
        // SAFETY: off < the slice's length in bytes: inside `s`.
        f(unsafe { p.add(off) });
    }
}

/// Bytes of each piece [`parallel_hash`] hashes on its own.
const HASH_PIECE: usize = 256 << 10;

/// A 64-bit hash of every byte of `data` (xxh3), the same wherever it runs: data longer than
/// one `HASH_PIECE` (256 KiB) is hashed piece by piece on the copy threads, and the pieces' hashes (with
/// the length) hashed again. Weights are identified by it on every call: hashed on one thread
/// they were most of a small layer's fixed cost on the H200 (0.2 ms for #4's 2.4 MB). twox-hash's
/// XXH3, which picks AVX2 at run time, was 1.6x faster on the development machine but 3x
/// slower on the H200's host (264 against 88 us for #4's weights, same call shape): not used.
pub fn parallel_hash(data: &[u8]) -> u64 {
    use xxhash_rust::xxh3::xxh3_64;
    if data.len() <= HASH_PIECE {
        return xxh3_64(data);
    }
    let pieces: Vec<&[u8]> = data.chunks(HASH_PIECE).collect();
    let mut hashes = vec![0u64; pieces.len() + 1];
    hashes[pieces.len()] = data.len() as u64;
    match pool() {
        // The calling thread hashes the first piece itself (see `parallel_copy`).
        Some(pool) => pool.in_place_scope(|s| {
            let mut pairs = hashes.iter_mut().zip(&pieces);
            let first = pairs.next();
            for (h, piece) in pairs {
                s.spawn(move |_| *h = xxh3_64(piece));
            }
            if let Some((h, piece)) = first {
                *h = xxh3_64(piece);
            }
        }),
        None => {
            for (h, piece) in hashes.iter_mut().zip(&pieces) {
                *h = xxh3_64(piece);
            }
        }
    }
    xxh3_64(bytemuck::cast_slice(&hashes))
}

/// `dst.copy_from_slice(src)` with streaming stores where the CPU has them (x86-64 with AVX)
/// and `SPORKLE_COPY_NT` is not `0`.
fn streaming_copy(src: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        static STREAMING: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *STREAMING.get_or_init(|| {
            std::env::var("SPORKLE_COPY_NT").map_or(true, |v| v != "0")
                && std::arch::is_x86_feature_detected!("avx")
        }) {
            // SAFETY: the CPU has AVX (checked above).
            unsafe { copy_nt_avx(src, dst) };
            return;
        }
    }
    dst.copy_from_slice(src);
}

/// See [`streaming_copy`]: plain copies up to the first 32-byte aligned float of `dst` and
/// after the last whole 8 floats, 8-float streaming stores between.
///
/// # Safety
/// The CPU must have AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn copy_nt_avx(src: &[f32], dst: &mut [f32]) {
    use std::arch::x86_64::{_mm256_loadu_ps, _mm256_stream_ps, _mm_sfence};
    assert_eq!(
        src.len(),
        dst.len(),
        "copy between slices of different lengths"
    );
    let head = dst.as_ptr().align_offset(32).min(dst.len());
    dst[..head].copy_from_slice(&src[..head]);
    let body = (dst.len() - head) / 8 * 8;
    let (s, d) = (src[head..].as_ptr(), dst[head..].as_mut_ptr());
    for i in (0..body).step_by(8) {
        // SAFETY: floats i..i + 8 lie within both slices past `head` (i + 8 <= body), and
        // d + i is 32-byte aligned (d is, and i is a multiple of 8 floats).
        unsafe { _mm256_stream_ps(d.add(i), _mm256_loadu_ps(s.add(i))) };
    }
    // Streaming stores are weakly ordered: fence them before the copy counts as done.
    _mm_sfence();
    dst[head + body..].copy_from_slice(&src[head + body..]);
}

/// A job for the [`CopyThread`].
type CopyJob = Box<dyn FnOnce() + Send>;

/// A thread kept by a streaming worker for its copies into staging, one at a time, in order:
/// made on first use and joined when dropped (so nothing of it outlives the worker). Starting a
/// thread for every job cost most on a loaded host, where streaming matters most.
#[derive(Default)]
pub struct CopyThread {
    jobs: Option<std::sync::mpsc::Sender<CopyJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CopyThread {
    /// Runs `copy` on the thread, starting it first if it is not running; fails only where no
    /// thread can be started. A copy that panics ends only itself (its caller sees its answer
    /// channel close).
    pub fn run(&mut self, copy: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        let mut copy: CopyJob = Box::new(copy);
        if let Some(jobs) = &self.jobs {
            match jobs.send(copy) {
                Ok(()) => return Ok(()),
                // The thread has gone: start another.
                Err(std::sync::mpsc::SendError(back)) => copy = back,
            }
        }
        self.stop();
        let (tx, rx) = std::sync::mpsc::channel::<CopyJob>();
        let thread = std::thread::Builder::new()
            .name("sporkle-copy".into())
            .spawn(move || {
                for job in rx {
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })?;
        tx.send(copy)
            .expect("the copy thread just started holds its receiver");
        (self.jobs, self.thread) = (Some(tx), Some(thread));
        Ok(())
    }

    /// Lets the thread finish its copies and joins it.
    fn stop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for CopyThread {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash covers every byte, in order, and the length, however the data splits into pieces.
    #[test]
    fn parallel_hash_sees_every_byte() {
        let data: Vec<u8> = (0..3 * HASH_PIECE + 77)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let base = parallel_hash(&data);
        assert_eq!(parallel_hash(&data), base, "deterministic");
        for i in [
            0,
            HASH_PIECE - 1,
            HASH_PIECE,
            2 * HASH_PIECE + 5,
            data.len() - 1,
        ] {
            let mut d = data.clone();
            d[i] ^= 1;
            assert_ne!(parallel_hash(&d), base, "byte {i}");
        }
        assert_ne!(parallel_hash(&data[..data.len() - 1]), base, "length");
        let small = &data[..HASH_PIECE];
        assert_eq!(parallel_hash(small), xxhash_rust::xxh3::xxh3_64(small));
    }

    /// Copies out of staging, demoting or not, at either size class, arrive whole at any
    /// alignment and write nothing outside.
    #[test]
    fn copies_out_of_staging_are_exact() {
        for len in [
            0,
            1,
            17,
            4095,
            4096,
            4097,
            3 * 4096 + 5,
            PARALLEL_COPY_MIN + 19,
        ] {
            let src: Vec<f32> = (0..len + 3).map(|i| i as f32 - 0.25).collect();
            for off in [0, 1, 3] {
                type CopyFn = fn(&[f32], &mut [f32]);
                let copies: [(&str, CopyFn); 2] = [
                    ("copy_from_staging", copy_from_staging),
                    ("demoting", demoting),
                ];
                for (what, copy) in copies {
                    assert_copies_exactly(what, &src[off..off + len], off, copy);
                }
            }
        }
    }

    #[test]
    fn cache_sizes_parse_as_sysfs_writes_them() {
        assert_eq!(parse_cache_size("2048K"), Some(2 << 20));
        assert_eq!(parse_cache_size("1M"), Some(1 << 20));
        assert_eq!(parse_cache_size("512"), Some(512));
        assert_eq!(parse_cache_size("K"), None);
        assert_eq!(parse_cache_size("big"), None);
    }

    /// Every float arrives, whatever the alignment of either slice and the length.
    #[test]
    fn copies_every_float_at_any_alignment_and_length() {
        let src: Vec<f32> = (0..200).map(|i| i as f32 + 0.5).collect();
        for src_off in 0..9 {
            for dst_off in 0..9 {
                for len in [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 150] {
                    let mut dst = vec![-1.0f32; 200];
                    streaming_copy(
                        &src[src_off..src_off + len],
                        &mut dst[dst_off..dst_off + len],
                    );
                    assert_eq!(
                        &dst[dst_off..dst_off + len],
                        &src[src_off..src_off + len],
                        "src +{src_off}, dst +{dst_off}, {len} floats"
                    );
                    assert!(
                        dst[..dst_off].iter().all(|&x| x == -1.0),
                        "wrote before dst"
                    );
                    assert!(
                        dst[dst_off + len..].iter().all(|&x| x == -1.0),
                        "wrote past dst"
                    );
                }
            }
        }
    }

    /// Large copies (split across threads) arrive whole.
    #[test]
    fn parallel_copy_of_a_large_buffer_is_exact() {
        let src: Vec<f32> = (0..PARALLEL_COPY_MIN * 3 + 5).map(|i| i as f32).collect();
        let mut dst = vec![0.0f32; src.len() + 1];
        parallel_copy(&src, &mut dst[1..]);
        assert_eq!(&dst[1..], &src[..]);
        assert_eq!(dst[0], 0.0);
    }

    /// Copies into staging of every size (one thread with streaming stores, or split) arrive
    /// whole, at any alignment, and write nothing outside.
    #[test]
    fn copy_to_staging_is_exact_at_every_size() {
        for len in [0, 1, 7, 8, 9, 1000, 4099, PARALLEL_COPY_MIN + 3] {
            let src: Vec<f32> = (0..len).map(|i| i as f32 + 0.5).collect();
            for off in [0, 1, 3] {
                assert_copies_exactly("copy_to_staging", &src, off, copy_to_staging);
            }
        }
    }

    /// `copy(src, dst)` into a destination `off` floats into a guarded buffer: the floats arrive
    /// whole and nothing outside them is written.
    fn assert_copies_exactly(what: &str, src: &[f32], off: usize, copy: fn(&[f32], &mut [f32])) {
        let len = src.len();
        let mut dst = vec![-1.0f32; len + off + 2];
        copy(src, &mut dst[off..off + len]);
        assert_eq!(&dst[off..off + len], src, "{what} {len} floats at +{off}");
        assert!(
            dst[..off]
                .iter()
                .chain(&dst[off + len..])
                .all(|&x| x == -1.0),
            "{what} {len} floats at +{off}: wrote outside"
        );
    }

    #[test]
    fn copy_thread_runs_jobs_in_order_and_outlives_a_panicking_one() {
        let mut t = CopyThread::default();
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..3 {
            let tx = tx.clone();
            t.run(move || tx.send(i).unwrap()).unwrap();
        }
        assert_eq!(rx.iter().take(3).collect::<Vec<_>>(), [0, 1, 2]);
        t.run(|| panic!("a copy that fails (expected in this test)"))
            .unwrap();
        let tx2 = tx.clone();
        t.run(move || tx2.send(7).unwrap()).unwrap();
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(5)), Ok(7));
    }
}
