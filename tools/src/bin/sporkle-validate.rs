//! `sporkle-validate`: the validation runner (libtest-style). The trials live in the
//! `sporkle-tools` library; `cargo test` runs the same ones through `tests/validate.rs`.
//!
//! The system allocator serves it: the leak trials run `sporkle-leak-child` (found beside this
//! binary), the one binary whose allocator is dhat's.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    sporkle_tools::main()
}
