//! `sporkle-validate`: the validation runner (libtest-style). The trials live in
//! `sporkle::validate`; `cargo test` runs the same ones through `tests/validate.rs`.
//!
//! dhat's allocator is the global allocator so that leak trials (which re-run this binary as a
//! child) can measure the heap; without a running profiler it forwards to the system allocator.

#![forbid(unsafe_code)]

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() -> std::process::ExitCode {
    sporkle::validate::main()
}
