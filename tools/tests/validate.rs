//! The whole validation harness as a `cargo test` target (`harness = false`): the same trials
//! as `sporkle-validate`, with libtest's command line (filters, `--list`, `--exact`, …).
//! The leak trials run the `sporkle-leak-child` binary cargo built for this package.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    sporkle_tools::leaks::set_child_exe(env!("CARGO_BIN_EXE_sporkle-leak-child"));
    sporkle_tools::main()
}
