//! The tidy trial (kind `[tidy]`): conventions that keep the code readable, checked rather than
//! hoped for. Every Rust file opens with a `//!` paragraph; `unsafe` appears only in the files
//! that need it (SIMD kernels, and the GL wrapper and context once they exist), and every
//! `unsafe` block or `unsafe impl` there has a `// SAFETY:` comment just above it (and the crate
//! denies `unsafe_code` outside the modules that hold those files); every suite says what it is for.

use libtest_mimic::{Completion, Failed, Trial};
use std::path::{Path, PathBuf};

/// The only files allowed to contain `unsafe` code.
const UNSAFE_ALLOWED: [&str; 11] = [
    // SIMD: the microkernels and their safe wrappers.
    "src/cpu/kernel/mod.rs",
    "src/cpu/kernel/avx512.rs",
    "src/gpu/gl.rs",
    "src/gpu/context.rs",
    // Lending a staging buffer to the caller's thread (HostMem::view's contract), and the copy
    // thread's pointer into it.
    "src/gpu/executor.rs",
    // The caller's side of a pinned input the GPU worker maps (PinnedShared::mapped).
    "src/gpu/job.rs",
    // Pinned inputs: the caller's view of a buffer that the GPU worker maps.
    "src/pinned.rs",
    // Streaming (non-temporal) stores for the host copies into and out of staging.
    "src/gpu/host_copy.rs",
    // Vulkan and CUDA: memory shared with GL, and CUDA copies (the C APIs).
    "src/gpu/vk.rs",
    "src/gpu/cu.rs",
    // Views of staging memory of either kind (MappedView::new).
    "src/gpu/memory.rs",
];

pub fn trials() -> Vec<Trial> {
    let root = sporkle::repo_root();
    let missing = no_source_tree(&root);
    vec![super::unless_missing(
        Trial::ignorable_test(super::named("tidy", "tidy/conventions"), move || {
            check(&root)
        }),
        missing,
    )]
}

/// Why tidy cannot run on `root`, if it cannot: the crate's sources are not there (the
/// binaries run from a copy of the tree without `src/`).
fn no_source_tree(root: &Path) -> Option<String> {
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.is_empty().then(|| {
        format!(
            "no Rust sources under {}: tidy checks the source tree, and this run has none",
            root.join("src").display()
        )
    })
}

/// The Rust files of the tree at `root`: the library's (`src/`, `tests/`) and the tools'
/// (`tools/src/`, `tools/tests/`).
fn sources(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["src", "tests", "tools/src", "tools/tests"] {
        rust_files(&root.join(dir), &mut files);
    }
    files
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// A line without its string literals and its trailing comment.
fn code_of(line: &str) -> String {
    let mut out = String::new();
    let (mut in_str, mut escaped) = (false, false);
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if in_str {
            match (c, escaped) {
                (_, true) => escaped = false,
                ('\\', false) => escaped = true,
                ('"', false) => in_str = false,
                _ => {}
            }
        } else if c == '"' {
            in_str = true;
        } else if c == '/' && chars.peek() == Some(&'/') {
            break;
        } else {
            out.push(c);
        }
    }
    out
}

/// The conventions over the tree at `root`; ignored (its precondition missing, neither a pass
/// nor a failure) where there is no source tree, as where the binaries run from a copy.
fn check(root: &Path) -> Result<Completion, Failed> {
    if let Some(why) = no_source_tree(root) {
        return Ok(Completion::ignored_with(why));
    }
    let files = sources(root);
    let mut problems = Vec::new();
    for path in &files {
        let rel = path
            .strip_prefix(root)
            .unwrap_or(path)
            .to_string_lossy()
            .replace('\\', "/");
        let text = std::fs::read_to_string(path).map_err(|e| format!("{rel}: {e}"))?;
        if !text.starts_with("//!") {
            problems.push(format!(
                "{rel}: does not open with a //! paragraph saying what it is for"
            ));
        }
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let code = code_of(line);
            let code = code.as_str();
            let block_or_impl = code.contains("unsafe {") || code.contains("unsafe impl");
            if !block_or_impl && !code.contains("unsafe fn") {
                continue;
            }
            if !UNSAFE_ALLOWED.contains(&rel.as_str()) {
                problems.push(format!(
                    "{rel}:{}: unsafe code outside {UNSAFE_ALLOWED:?}",
                    i + 1
                ));
            } else if block_or_impl {
                let above = &lines[i.saturating_sub(6)..i];
                if !above.iter().any(|l| l.contains("// SAFETY:")) && !line.contains("// SAFETY:") {
                    problems.push(format!(
                        "{rel}:{}: unsafe block or impl without a // SAFETY: comment above it",
                        i + 1
                    ));
                }
            } else if !lines[i.saturating_sub(12)..i]
                .iter()
                .any(|l| l.contains("# Safety"))
            {
                problems.push(format!(
                    "{rel}:{}: unsafe fn without a # Safety section",
                    i + 1
                ));
            }
        }
    }
    for suite in ["basic", "edge", "regression", "stress", "benchdnn", "perf"] {
        match sporkle::suite::Suite::load(&root.join(format!("suites/{suite}.toml"))) {
            Ok(s) if s.description.trim().is_empty() => {
                problems.push(format!("suites/{suite}.toml: no description"))
            }
            Ok(_) => {}
            Err(e) => problems.push(e.to_string()),
        }
    }
    if problems.is_empty() {
        Ok(Completion::Completed)
    } else {
        Err(problems.join("\n").into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a source tree the trial is ignored with the reason; with this crate's tree it
    /// completes; a file without its `//!` paragraph fails it.
    #[test]
    fn no_sources_is_ignored_and_a_bad_file_fails() {
        let empty = tempfile::tempdir().unwrap();
        match check(empty.path()) {
            Ok(Completion::Ignored { reason: Some(r) }) => assert!(r.contains("no Rust sources")),
            _ => panic!("an empty tree must be ignored with the reason"),
        }
        assert!(matches!(
            check(&sporkle::repo_root()),
            Ok(Completion::Completed)
        ));
        // Tests without the crate's sources are no source tree either.
        let tests_only = tempfile::tempdir().unwrap();
        std::fs::create_dir(tests_only.path().join("tests")).unwrap();
        std::fs::write(tests_only.path().join("tests/t.rs"), "//! t\n").unwrap();
        assert!(matches!(
            check(tests_only.path()),
            Ok(Completion::Ignored { .. })
        ));
        let bad = tempfile::tempdir().unwrap();
        std::fs::create_dir(bad.path().join("src")).unwrap();
        std::fs::write(bad.path().join("src/x.rs"), "fn main() {}\n").unwrap();
        let e = check(bad.path())
            .err()
            .expect("a file without //! must fail");
        assert!(e.message().unwrap().contains("src/x.rs"));
        // The tools' sources are checked too.
        let bad_tool = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(bad_tool.path().join("tools/src")).unwrap();
        std::fs::create_dir(bad_tool.path().join("src")).unwrap();
        std::fs::write(bad_tool.path().join("src/ok.rs"), "//! ok\n").unwrap();
        std::fs::write(bad_tool.path().join("tools/src/y.rs"), "fn main() {}\n").unwrap();
        let e = check(bad_tool.path())
            .err()
            .expect("a tool's file without //! must fail");
        assert!(e.message().unwrap().contains("tools/src/y.rs"));
    }

    /// `unsafe impl` is held to the rules of `unsafe` blocks: only in the allowed files, and
    /// with a `// SAFETY:` comment above it.
    #[test]
    fn an_unsafe_impl_needs_its_safety_comment_and_its_place() {
        let problems = |file: &str, body: &str| {
            let tree = tempfile::tempdir().unwrap();
            let path = tree.path().join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, format!("//! x\nstruct P;\n{body}")).unwrap();
            check(tree.path())
                .err()
                .map(|e| e.message().unwrap_or_default().to_owned())
                .unwrap_or_default()
        };
        let bare = "unsafe impl Send for P {}\n";
        let explained = "// SAFETY: P holds nothing.\nunsafe impl Send for P {}\n";
        assert!(problems("src/pinned.rs", bare).contains("src/pinned.rs:3: unsafe block or impl"));
        assert!(!problems("src/pinned.rs", explained).contains("unsafe"));
        assert!(problems("src/x.rs", explained).contains("src/x.rs:4: unsafe code outside"));
    }
}
