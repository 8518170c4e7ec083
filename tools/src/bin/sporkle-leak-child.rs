//! `sporkle-leak-child`: the leak trials' child process (`sporkle_tools::leaks`). Its global
//! allocator is dhat's, which counts every heap block (and serialises allocations behind a
//! lock, which is why no other binary uses it). Run by `sporkle-validate`, not by hand.

#![forbid(unsafe_code)]

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() -> std::process::ExitCode {
    sporkle_tools::leaks::child_main()
}
