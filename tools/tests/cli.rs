//! The `sporkle` command line as a user meets it: a convolution on `.npy` files that matches the
//! reference, and every kind of bad input answered with one line on stderr, a non-zero exit and
//! no output file.

use sporkle::{data, npy, reference, tolerance, Conv2dParams};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sporkle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sporkle"))
        .args(args)
        .output()
        .expect("run sporkle")
}

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn npy(&self, name: &str, shape: &[usize], seed: u64) -> (String, Vec<f32>) {
        let mut v = vec![0.0; shape.iter().product()];
        data::fill_uniform(seed, &mut v);
        npy::write(&self.path(name), shape, &v).unwrap();
        (self.path(name).to_string_lossy().into_owned(), v)
    }

    fn raw(&self, name: &str, bytes: &[u8]) -> String {
        std::fs::write(self.path(name), bytes).unwrap();
        self.path(name).to_string_lossy().into_owned()
    }
}

/// Asserts a clean failure: non-zero exit, one stderr line that mentions `needle`, no output.
fn assert_fails(out: &Output, needle: &str, output_file: &Path) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "error must be one line: {stderr:?}"
    );
    assert!(
        stderr.contains(needle),
        "stderr {stderr:?} should mention {needle:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !output_file.exists(),
        "no output file may be written on failure"
    );
    assert!(out.stdout.is_empty(), "nothing on stdout on failure");
}

#[test]
fn conv2d_matches_the_reference_and_reports_json() {
    let f = Files::new();
    // 2 images, 6 channels, 11×9; 4 filters over 3 channels (2 groups), 3×2 kernel.
    let (x, xv) = f.npy("x.npy", &[2, 6, 11, 9], 1);
    let (w, wv) = f.npy("w.npy", &[4, 3, 3, 2], 2);
    let (b, bv) = f.npy("b.npy", &[4], 3);
    let y = f.path("y.npy");
    let out = sporkle(&[
        "conv2d",
        "--input",
        &x,
        "--weights",
        &w,
        "--bias",
        &b,
        "--stride",
        "2,1",
        "--padding",
        "1",
        "--dilation",
        "1,2",
        "--groups",
        "2",
        "--device",
        "cpu",
        "--output",
        y.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["device"], "cpu");
    assert!(info["wall_ms"].as_f64().unwrap() > 0.0);
    assert!(info["gflops"].as_f64().unwrap() > 0.0);
    let p = Conv2dParams::new(2, 6, 11, 9, 4, 3, 2)
        .with_stride(2, 1)
        .with_padding(1, 1)
        .with_dilation(1, 2)
        .with_groups(2);
    let got = npy::read(&y).unwrap();
    let (ho, wo) = p.out_hw();
    assert_eq!(got.shape, vec![2, 4, ho, wo]);
    let r = reference::conv2d_f64(&p, &xv, &wv, Some(&bv)).unwrap();
    tolerance::compare(&p, &got.data, &r, tolerance::Tolerance::Fp32).unwrap();
}

#[test]
fn auto_device_says_why() {
    let f = Files::new();
    let (x, _) = f.npy("x.npy", &[1, 2, 5, 5], 1);
    let (w, _) = f.npy("w.npy", &[3, 2, 3, 3], 2);
    let y = f.path("y.npy");
    let out = sporkle(&[
        "conv2d",
        "--input",
        &x,
        "--weights",
        &w,
        "--output",
        y.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["device"], "cpu");
    // A tiny job stays on the CPU: below the GPU floor, or because there is no GPU.
    let reason = info["reason"].as_str().unwrap();
    assert!(
        reason.contains("below the GPU floor") || reason.contains("GPU"),
        "{reason}"
    );
}

/// Padding per side and by rule (ONNX's pads and auto_pad, PyTorch's 'same'), against the
/// reference with the padding the rule implies.
#[test]
fn padding_per_side_and_by_rule() {
    let f = Files::new();
    let (x, xv) = f.npy("x.npy", &[1, 3, 7, 6], 1);
    let (w, wv) = f.npy("w.npy", &[4, 3, 2, 4], 2);
    let base = Conv2dParams::new(1, 3, 7, 6, 4, 2, 4);
    // SAME_UPPER at stride 2: ho = ceil(7/2) = 4 needs 1 row (after), wo = ceil(6/2) = 3 needs
    // 2 columns (1 each side); SAME_LOWER puts the odd row before.
    for (padding, stride, pads) in [
        ("0,1,2,3", "1", [0, 1, 2, 3]),
        ("2,1", "1", [2, 1, 2, 1]),
        ("same", "2", [0, 1, 1, 1]),
        ("same-lower", "2", [1, 1, 0, 1]),
        ("valid", "1", [0, 0, 0, 0]),
    ] {
        let y = f.path(&format!("y_{padding}.npy"));
        let out = sporkle(&[
            "conv2d",
            "--input",
            &x,
            "--weights",
            &w,
            "--padding",
            padding,
            "--stride",
            stride,
            "--device",
            "cpu",
            "--output",
            y.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{padding}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = stride.parse().unwrap();
        let [t, l, b, r] = pads;
        let p = base.with_stride(s, s).with_pads(t, l, b, r);
        let got = npy::read(&y).unwrap();
        let (ho, wo) = p.out_hw();
        assert_eq!(got.shape, vec![1, 4, ho, wo], "{padding}");
        if padding.starts_with("same") {
            assert_eq!((ho, wo), (4, 3), "{padding}: ceil(in / stride)");
        }
        let refv = reference::conv2d_f64(&p, &xv, &wv, None).unwrap();
        tolerance::compare(&p, &got.data, &refv, tolerance::Tolerance::Fp32).unwrap();
    }
}

#[test]
fn bad_inputs_fail_cleanly_without_output() {
    let f = Files::new();
    let (x, _) = f.npy("x.npy", &[1, 4, 6, 6], 1);
    let (w, _) = f.npy("w.npy", &[2, 4, 3, 3], 2);
    let (x3, _) = f.npy("x3.npy", &[4, 6, 6], 3);
    let (b3, _) = f.npy("b3.npy", &[3], 4);
    let (wg, _) = f.npy("wg.npy", &[2, 3, 3, 3], 5);
    let mut f8 = b"\x93NUMPY\x01\x00".to_vec();
    let header = "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 1, 1, 1), }";
    let padded = format!("{header:<117}\n");
    f8.extend_from_slice(&(padded.len() as u16).to_le_bytes());
    f8.extend_from_slice(padded.as_bytes());
    f8.extend_from_slice(&[0; 8]);
    let xf8 = f.raw("xf8.npy", &f8);
    let trunc = {
        let bytes = std::fs::read(&x).unwrap();
        f.raw("trunc.npy", &bytes[..bytes.len() - 6])
    };
    let junk = f.raw("junk.npy", b"hello");
    let y = f.path("y.npy");
    let ys = y.to_str().unwrap();
    let missing = f.path("missing.npy").to_string_lossy().into_owned();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--input", &missing, "--weights", &w], "missing.npy"),
        (vec!["--input", &xf8, "--weights", &w], "'<f8'"),
        (vec!["--input", &trunc, "--weights", &w], "truncated"),
        (vec!["--input", &junk, "--weights", &w], "not a valid .npy"),
        (vec!["--input", &x3, "--weights", &w], "must be 4-D"),
        (
            vec!["--input", &x, "--weights", &wg],
            "input channels per filter",
        ),
        (
            vec!["--input", &x, "--weights", &w, "--bias", &b3],
            "bias must have shape [2]",
        ),
        (
            vec!["--input", &x, "--weights", &w, "--stride", "0"],
            "stride",
        ),
        (
            vec!["--input", &x, "--weights", &w, "--stride", "a"],
            "not a non-negative integer",
        ),
        (
            vec!["--input", &x, "--weights", &w, "--dilation", "4"],
            "empty",
        ),
        (
            vec!["--input", &x, "--weights", &w, "--groups", "3"],
            "groups = 3",
        ),
        (
            vec!["--input", &x, "--weights", &w, "--device", "tpu"],
            "tpu",
        ),
        (vec!["--input", &x], "--weights"),
        (
            vec!["--input", &x, "--weights", &w, "--padding", "0,1,1"],
            "1, 2 or 4 numbers (P, PH,PW or T,L,B,R), not 3",
        ),
        (
            vec!["--input", &x, "--weights", &w, "--stride", "-1"],
            "\"-1\" is not a non-negative integer",
        ),
        (
            vec!["--input", &x, "--weights", &w, "--padding", "-2,1"],
            "\"-2\" in \"-2,1\" is not a non-negative integer",
        ),
        (
            vec!["--input", &x, "--weights", &w, "--padding", "sideways"],
            "\"sideways\"",
        ),
    ];
    for (args, needle) in cases {
        let mut full = vec!["conv2d"];
        full.extend(args);
        full.extend(["--output", ys]);
        assert_fails(&sporkle(&full), needle, &y);
    }
    // An output path in a directory that does not exist: the error names it, nothing is left.
    let nowhere = f.path("no/such/dir/y.npy");
    let out = sporkle(&[
        "conv2d",
        "--input",
        &x,
        "--weights",
        &w,
        "--output",
        nowhere.to_str().unwrap(),
    ]);
    assert_fails(&out, "no/such/dir/y.npy", &nowhere);
}

#[test]
fn device_gpu_is_right_or_says_why_not() {
    let f = Files::new();
    let (x, xv) = f.npy("x.npy", &[1, 4, 9, 9], 1);
    let (w, wv) = f.npy("w.npy", &[20, 4, 3, 3], 2);
    let y = f.path("y.npy");
    let args = [
        "conv2d",
        "--input",
        &x,
        "--weights",
        &w,
        "--padding",
        "1",
        "--device",
        "gpu",
        "--output",
        y.to_str().unwrap(),
    ];
    // With the GPU switched off: a clean failure that names the reason.
    let off = Command::new(env!("CARGO_BIN_EXE_sporkle"))
        .args(args)
        .env("SPORKLE_GPU", "off")
        .output()
        .unwrap();
    assert_fails(&off, "SPORKLE_GPU=off", &y);
    // Otherwise: either a correct result or a clean "device unavailable" failure.
    let out = sporkle(&args);
    if out.status.success() {
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(info["device"], "gpu");
        let p = Conv2dParams::new(1, 4, 9, 9, 20, 3, 3).with_padding(1, 1);
        let r = reference::conv2d_f64(&p, &xv, &wv, None).unwrap();
        tolerance::compare(
            &p,
            &npy::read(&y).unwrap().data,
            &r,
            tolerance::Tolerance::Fp32,
        )
        .unwrap();
    } else {
        assert_fails(&out, "device unavailable", &y);
    }
}

#[test]
fn bench_prints_json_lines_and_compares_with_a_peer() {
    let f = Files::new();
    let suite = f.raw(
        "s.toml",
        b"[[case]]\nname = \"tiny\"\nn = 1\nc_in = 8\nh = 12\nw = 12\nc_out = 16\nk_h = 3\nk_w = 3\npadding = 1\nbias = true\n",
    );
    let peer = f.raw(
        "peer.json",
        b"{\"shape\": \"tiny\", \"device\": \"peer-cpu\", \"ms\": 1.0, \"gflops\": 2.0}\n",
    );
    let json = f.path("out.json");
    let out = sporkle(&[
        "bench",
        "--suite",
        &suite,
        "--seconds",
        "0.01",
        "--threads",
        "1",
        "--json",
        json.to_str().unwrap(),
        "--compare",
        &peer,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(line["shape"], "tiny");
    assert_eq!(line["device"], "sporkle-cpu-1t");
    assert!(line["ms"].as_f64().unwrap() > 0.0 && line["gflops"].as_f64().unwrap() > 0.0);
    assert!(
        stdout.contains("| tiny |") && stdout.contains("geometric mean"),
        "{stdout}"
    );
    assert_eq!(std::fs::read_to_string(&json).unwrap().lines().count(), 1);
    assert_fails(
        &sporkle(&["bench", "--suite", &suite, "nope"]),
        "no shape \"nope\"",
        &f.path("none"),
    );
}

#[test]
fn devices_lists_the_cpu() {
    let out = sporkle(&["devices"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("cpu:") && text.contains("microkernel:"),
        "{text}"
    );
}

/// A reader that goes away (`sporkle devices | head -1`) ends the program quietly, no panic.
#[test]
fn a_closed_stdout_is_not_a_panic() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sporkle"))
        .arg("devices")
        .env("SPORKLE_GPU", "off")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `--output` through a link writes where the link points and leaves the link a link; a
/// device (here `/dev/stdout`, and a link to `/dev/null`) is written in place, never replaced.
#[test]
fn output_follows_links_and_writes_devices_in_place() {
    let f = Files::new();
    let (x, _) = f.npy("x.npy", &[1, 2, 5, 5], 1);
    let (w, _) = f.npy("w.npy", &[3, 2, 3, 3], 2);
    let run = |out: &str| {
        sporkle(&[
            "conv2d",
            "--input",
            &x,
            "--weights",
            &w,
            "--device",
            "cpu",
            "--output",
            out,
        ])
    };
    let target = f.path("target.npy");
    std::fs::write(&target, b"old").unwrap();
    let link = f.path("link.npy");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let out = run(link.to_str().unwrap());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(npy::read(&target).unwrap().shape, vec![1, 3, 3, 3]);
    // A dangling link: the file it names is created.
    let dangling = f.path("dangling.npy");
    std::os::unix::fs::symlink(f.path("made.npy"), &dangling).unwrap();
    assert!(run(dangling.to_str().unwrap()).status.success());
    assert!(std::fs::symlink_metadata(&dangling)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        npy::read(&f.path("made.npy")).unwrap().shape,
        vec![1, 3, 3, 3]
    );
    // A link to a device.
    let null = f.path("null.npy");
    std::os::unix::fs::symlink("/dev/null", &null).unwrap();
    assert!(run(null.to_str().unwrap()).status.success());
    assert!(std::fs::symlink_metadata(&null)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(
        !std::fs::metadata("/dev/null").unwrap().is_file(),
        "/dev/null is still a device"
    );
    // /dev/stdout: the array, then the JSON line, both on stdout; /dev/stdout itself untouched.
    let was_link = std::fs::symlink_metadata("/dev/stdout").map(|m| m.file_type().is_symlink());
    let out = run("/dev/stdout");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout.starts_with(b"\x93NUMPY"),
        "the array comes first on stdout"
    );
    let json_at = out.stdout.iter().rposition(|&b| b == b'{').unwrap();
    let info: serde_json::Value = serde_json::from_slice(&out.stdout[json_at..]).unwrap();
    assert_eq!(info["device"], "cpu");
    let now_link = std::fs::symlink_metadata("/dev/stdout").map(|m| m.file_type().is_symlink());
    assert_eq!(
        was_link.ok(),
        now_link.ok(),
        "/dev/stdout must not be replaced"
    );
    // A directory is an error, by name or with a trailing slash, and nothing is written.
    assert_fails(
        &run(f.dir.path().to_str().unwrap()),
        "is a directory",
        &f.path("none.npy"),
    );
    let slash = format!("{}/", f.path("sub").display());
    assert_fails(&run(&slash), "is a directory name", &f.path("sub"));
}

/// Memory follows the work: a huge stride on a small input is quick and small on every
/// device; an output larger than the machine's memory is a one-line error before allocating.
#[test]
fn huge_strides_are_cheap_and_huge_outputs_are_errors() {
    let f = Files::new();
    let (x, xv) = f.npy("x.npy", &[1, 4, 32, 32], 1);
    let (w, wv) = f.npy("w.npy", &[2, 4, 3, 3], 2);
    let y = f.path("y.npy");
    for (stride, device) in [
        ("100000", "cpu"),
        ("10000", "cpu"),
        ("100000", "auto"),
        ("100000,1", "cpu"),
    ] {
        let start = std::time::Instant::now();
        let out = sporkle(&[
            "conv2d",
            "--input",
            &x,
            "--weights",
            &w,
            "--stride",
            stride,
            "--device",
            device,
            "--output",
            y.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{stride} {device}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            start.elapsed().as_secs_f64() < 10.0,
            "{stride} {device}: {:?}",
            start.elapsed()
        );
        let (sh, sw) = match stride.split_once(',') {
            Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
            None => (stride.parse().unwrap(), stride.parse().unwrap()),
        };
        let p = Conv2dParams::new(1, 4, 32, 32, 2, 3, 3).with_stride(sh, sw);
        let got = npy::read(&y).unwrap();
        assert_eq!(got.shape, vec![1, 2, p.out_hw().0, p.out_hw().1]);
        let r = reference::conv2d_f64(&p, &xv, &wv, None).unwrap();
        tolerance::compare(&p, &got.data, &r, tolerance::Tolerance::Fp32).unwrap();
        std::fs::remove_file(&y).unwrap();
    }
    // 2 filters of 200,002 x 200,002 outputs: 320 GB.
    for device in ["cpu", "auto", "gpu"] {
        let out = sporkle(&[
            "conv2d",
            "--input",
            &x,
            "--weights",
            &w,
            "--padding",
            "100000",
            "--device",
            device,
            "--output",
            y.to_str().unwrap(),
        ]);
        if sporkle::host_mem::available_bytes().is_some_and(|b| b > 320_096_007_200) {
            eprintln!("this machine holds 320 GB: the huge-output check cannot be made here");
            continue;
        }
        assert_fails(&out, "out of memory: the output needs 320.1 GB", &y);
    }
}

fn validate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sporkle-validate"))
        .args(args)
        .output()
        .expect("run sporkle-validate")
}

/// `--format json` is JSON lines only (diagnostics go to stderr), and every trial's name is
/// unique: it names the device.
#[test]
fn runner_json_lines_parse_with_unique_names() {
    let out = validate(&["--format", "json", "fingerprint/", "golden/resnet"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names = std::collections::HashSet::new();
    let mut results = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        if v["type"] == "test" && v["event"] != "started" {
            let name = v["name"].as_str().unwrap().to_owned();
            assert!(name.starts_with('['), "the name names the device: {name}");
            assert!(names.insert(name.clone()), "{name} appears twice");
            results += 1;
        }
    }
    assert!(results >= 8, "only {results} results");
}

/// Every `sporkle-validate` command in README.md parses as written: run with `--list`, it
/// exits 0 and lists at least one trial.
#[test]
fn readme_runner_commands_run_as_written() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let mut checked = 0;
    for line in readme.lines() {
        let Some((_, rest)) = line.split_once("--bin sporkle-validate") else {
            continue;
        };
        let command = rest.split(" #").next().unwrap_or(rest).trim();
        let args = command.strip_prefix("--").unwrap_or(command).trim();
        if args.contains("--report") || args.contains('`') {
            continue; // writes files, or prose rather than a command
        }
        // Shell words: single quotes group.
        let mut words = Vec::new();
        for (i, part) in args.split('\'').enumerate() {
            if i % 2 == 1 {
                words.push(part.to_owned());
            } else {
                words.extend(part.split_whitespace().map(str::to_owned));
            }
        }
        if !words.iter().any(|w| w == "--list") {
            words.push("--list".into());
        }
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let out = validate(&words);
        assert!(
            out.status.success(),
            "README: `{line}`: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        if words.contains(&"--help") {
            assert!(
                said.contains("sporkle-validate") && said.contains("--stress"),
                "{said}"
            );
        } else {
            assert!(said.contains(": test"), "README: `{line}` lists no trial");
        }
        checked += 1;
    }
    assert!(
        checked >= 4,
        "only {checked} runner commands found in README.md"
    );
}

/// Stress trials that run at once keep apart: each device's summary is its own line, said
/// once, naming the device, and its memory figure says it is the whole process's.
#[test]
fn stress_summaries_name_their_device() {
    let out = Command::new(env!("CARGO_BIN_EXE_sporkle-validate"))
        .args(["--stress", "stress-run/"])
        .env("SPORKLE_STRESS_SECS", "1")
        .output()
        .expect("run sporkle-validate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for kind in ["cpu", "cpu-portable"] {
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with(&format!("stress [{kind}]:")))
            .collect();
        if kind == "cpu-portable" && lines.is_empty() {
            continue; // no SIMD microkernel here, so no portable twin
        }
        assert_eq!(lines.len(), 1, "{kind}: {stderr}");
        assert!(
            lines[0].contains("verified, 0 mismatches")
                && lines[0].contains("the process's peak resident memory"),
            "{}",
            lines[0]
        );
    }
}
