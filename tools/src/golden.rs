//! Golden trials: cases computed by an independent producer (onnxruntime, through
//! `golden/make_golden.py`, versions in `golden/cases/manifest.json`), which every device,
//! the reference included, must match; and fingerprint trials: an insta snapshot per case and
//! numerics key (`golden/snapshots/`) of a device's exact output bits and rounded statistics,
//! so a kernel change that moves numerics shows up as a diff to review (`cargo insta review`,
//! or `SPORKLE_BLESS=1` to accept). CI never writes them: a missing or changed one fails.

use super::{fail, trial, Context, Device};
use libtest_mimic::{Failed, Trial};
use serde::Deserialize;
use sporkle::reference::{self, OutIndex, RefValue};
use sporkle::suite::Case;
use sporkle::tolerance::{compare_points, Tolerance};
use sporkle::{npy, Conv2dParams, Error};
use std::path::PathBuf;
use std::sync::Arc;

/// `golden/cases/manifest.json`: the producer's versions, and the cases in the suite format
/// (the same keys as `suites/*.toml`, read by the same deserializer).
#[derive(Deserialize)]
struct Manifest {
    producer: serde_json::Value,
    cases: Vec<Case>,
}

/// A case's arrays, checked against its parameters.
struct Loaded {
    p: Conv2dParams,
    x: Vec<f32>,
    w: Vec<f32>,
    b: Option<Vec<f32>>,
    y: Vec<f32>,
}

fn dir() -> PathBuf {
    sporkle::repo_root().join("golden")
}

fn load(case: &Case) -> sporkle::Result<Loaded> {
    let p = case.params;
    p.validate()?;
    let d = dir().join("cases").join(&case.name);
    let (ho, wo) = p.out_hw();
    let read = |file: &str, shape: Vec<usize>| -> sporkle::Result<Vec<f32>> {
        let path = d.join(file);
        let a = npy::read(&path)?;
        if a.shape != shape {
            return Err(Error::Npy {
                path,
                problem: format!("shape {:?}, the manifest says {shape:?}", a.shape),
            });
        }
        Ok(a.data)
    };
    Ok(Loaded {
        x: read("x.npy", vec![p.n, p.c_in, p.h, p.w])?,
        w: read("w.npy", vec![p.c_out, p.c_in_per_group(), p.k_h, p.k_w])?,
        b: if case.bias {
            Some(read("b.npy", vec![p.c_out])?)
        } else {
            None
        },
        y: read("y.npy", vec![p.n, p.c_out, ho, wo])?,
        p,
    })
}

pub fn trials(ctx: &Arc<Context>) -> sporkle::Result<Vec<Trial>> {
    let path = dir().join("cases/manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Suite {
        path: path.clone(),
        problem: format!("cannot read: {e}"),
    })?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| Error::Suite {
        path: path.clone(),
        problem: e.to_string(),
    })?;
    let producer = Arc::new(manifest.producer.to_string());
    let mut out = Vec::new();
    for device in ctx.devices.iter().filter(|d| d.gpu_backend().is_some()) {
        let dev = device.clone();
        out.push(trial(
            "fingerprint/arithmetic_class".into(),
            device,
            None,
            move || arithmetic_is_the_kernels(&dev),
        ));
    }
    for case in manifest.cases {
        for device in &ctx.devices {
            let (c, dev, prod) = (case.clone(), device.clone(), Arc::clone(&producer));
            out.push(trial(
                format!("golden/{}", case.name),
                device,
                None,
                move || matches_producer(&c, &dev, &prod),
            ));
            if !device.has_fixed_numerics() {
                continue;
            }
            let (c, dev) = (case.clone(), device.clone());
            out.push(trial(
                format!("fingerprint/{}", case.name),
                device,
                None,
                move || fingerprint(&c, &dev),
            ));
            // Winograd, which the GPU picks only for large layers, forced where it applies.
            if let Device::Gpu { backend } = device {
                if sporkle::winograd::applies(&case.params) {
                    let (c, gpu) = (case.clone(), Arc::clone(backend));
                    out.push(trial(
                        format!("fingerprint/{}{WINOGRAD}", case.name),
                        device,
                        None,
                        move || fingerprint_winograd(&c, &gpu),
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// The suffix of a case's name for its fingerprints with Winograd forced.
const WINOGRAD: &str = "_winograd";

/// [`fingerprint`] of the GPU's output with Winograd forced (its own case name, `{case}_winograd`,
/// and plan key); the output is first checked against the reference with Winograd's bound.
fn fingerprint_winograd(case: &Case, gpu: &sporkle::GpuBackend) -> Result<(), Failed> {
    use sporkle::gpu::{Algorithm, Dispatches};
    let g = load(case).map_err(fail)?;
    let numerics = super::devices::Numerics {
        family: "gpu",
        arithmetic: gpu.arithmetic().map_err(fail)?.name(),
        plan: (gpu.plan_info_with(&g.p, g.b.is_some(), Some(Algorithm::Winograd)))
            .map_err(fail)?
            .key(),
    };
    if !numerics.plan.starts_with("winograd") {
        return Err(format!("forcing Winograd planned {}", numerics.plan).into());
    }
    let mut y = vec![f32::NAN; g.p.output_len()];
    let forced = Dispatches {
        algorithm: Some(Algorithm::Winograd),
        ..Dispatches::ONE
    };
    gpu.time_kernel(&g.p, &g.x, &g.w, g.b.as_deref(), &mut y, forced)
        .map_err(fail)?;
    let r = sporkle::tolerance::reference(&g.p, &g.x, &g.w, g.b.as_deref(), Tolerance::Winograd)
        .map_err(fail)?;
    sporkle::tolerance::compare(&g.p, &y, &r, Tolerance::Winograd)
        .map_err(|m| fail(format!("{}: {m}", g.p)))?;
    let named = Case {
        name: format!("{}{WINOGRAD}", case.name),
        ..case.clone()
    };
    check_print(&named, &numerics, &g.p, &y)
}

/// The device's output against the producer's, within twice the tolerance bound (both the
/// producer and the device round).
fn matches_producer(case: &Case, device: &Device, producer: &str) -> Result<(), Failed> {
    let g = load(case).map_err(fail)?;
    let got = device
        .conv2d(&g.p, &g.x, &g.w, g.b.as_deref())
        .map_err(fail)?;
    let magnitudes = reference::conv2d_f64(&g.p, &g.x, &g.w, g.b.as_deref())
        .map_err(fail)?
        .magnitude;
    let points = (0..got.len()).map(|i| {
        let r = RefValue {
            value: f64::from(g.y[i]),
            magnitude: 2.0 * magnitudes[i],
        };
        (OutIndex::from_flat(&g.p, i), got[i], r)
    });
    compare_points(&g.p, points, Tolerance::Fp32)
        .map(|_| ())
        .map_err(|m| {
            fail(format!(
                "{} differs from the producer ({producer}): {m}",
                device.kind()
            ))
        })
}

/// The GPU's arithmetic class, which names its fingerprints, is the kernels' own: two
/// convolutions whose result is one value if `fma()` rounds once and another if it rounds
/// twice, and one whose result is subnormal, each on the narrow kernel (one filter) and the
/// tiled kernel (64 filters), must give what the probe's class predicts.
fn arithmetic_is_the_kernels(device: &Device) -> Result<(), Failed> {
    use sporkle::gpu::arithmetic::Fma;
    let gpu = device.gpu_backend().ok_or("not a GPU device")?;
    let class = gpu.arithmetic().map_err(fail)?;
    let a = 1.0 + 1.0 / 4096.0;
    let (exact, tiny) = (1.0 / 16_777_216.0f32, 1.0 / (2.0f32).powi(70));
    let mut checked = Vec::new();
    for c_out in [1, 64] {
        // Taps summed in order: round(x0 * w0) = -(1 + 2^-11) exactly, then x1 * w1 added.
        let p = Conv2dParams::new(1, 2, 1, 1, c_out, 1, 1);
        let plan = device
            .numerics(&p, false)
            .map_err(fail)?
            .map_or_else(String::new, |n| n.plan);
        let y = device
            .conv2d(
                &p,
                &[-(1.0 + 1.0 / 2048.0), a],
                &[1.0, a].repeat(c_out),
                None,
            )
            .map_err(fail)?;
        let want = match class.fma {
            Fma::Fused => Some(exact),
            Fma::Unfused => Some(0.0),
            Fma::Mixed => None,
        };
        if let Some(v) = y.iter().find(|&&v| want.is_some_and(|w| v != w)) {
            return Err(fail(format!(
                "the probe says {}, but plan {plan} gave {v:e} (fused: 2^-24, twice rounded: 0)",
                class.name()
            )));
        }
        let p = Conv2dParams::new(1, 1, 1, 1, c_out, 1, 1);
        let y = device
            .conv2d(&p, &[tiny], &vec![tiny; c_out], None)
            .map_err(fail)?;
        let want = if class.flushes_subnormals {
            0.0
        } else {
            tiny * tiny
        };
        if let Some(v) = y.iter().find(|&&v| v != want) {
            return Err(fail(format!(
                "the probe says {}, but plan {plan} gave 2^-70 * 2^-70 = {v:e}",
                class.name()
            )));
        }
        checked.push(plan);
    }
    eprintln!(
        "arithmetic {} holds on plans {}",
        class.name(),
        checked.join(", ")
    );
    Ok(())
}

/// The command that accepts new fingerprints (CI never writes them).
pub const ACCEPT: &str =
    "SPORKLE_BLESS=1 cargo run --release --bin sporkle-validate -- fingerprint";

/// A device's exact bits for a case (FNV-1a over every output) and rounded statistics, checked
/// against the fingerprints stored under `golden/snapshots/{case}@{key}.snap`, where the key
/// names what fixes the bits ([`super::devices::Numerics`]): the arithmetic class and the plan.
///
/// - The stored fingerprint of this key: its text must be this run's (a diff is a numerics
///   change to review).
/// - No fingerprint of this key: bits equal to a stored one of the same family, case and plan
///   (another arithmetic class that happens to round alike here) pass, and the trial says
///   which it matched.
/// - Otherwise the bits are new: in CI a failure naming the command that accepts them
///   ([`ACCEPT`]); elsewhere insta's review flow (`.snap.new` files, `cargo insta review`); with
///   `SPORKLE_BLESS=1` they are written.
fn fingerprint(case: &Case, device: &Device) -> Result<(), Failed> {
    let g = load(case).map_err(fail)?;
    let numerics = device
        .numerics(&g.p, g.b.is_some())
        .map_err(fail)?
        .ok_or("this device's numerics are not fixed")?;
    let y = device
        .conv2d(&g.p, &g.x, &g.w, g.b.as_deref())
        .map_err(fail)?;
    check_print(case, &numerics, &g.p, &y)
}

/// The fingerprint of output `y` of `case` made with `numerics`, against the stored ones (see
/// [`fingerprint`]).
fn check_print(
    case: &Case,
    numerics: &super::devices::Numerics,
    p: &Conv2dParams,
    y: &[f32],
) -> Result<(), Failed> {
    let print = Print::of(p, numerics, y);
    let text = print.text(&case.name);
    let key = numerics.key();
    let stored = stored_prints(&case.name).map_err(fail)?;
    let bless = std::env::var("INSTA_UPDATE").is_ok_and(|v| v == "always");
    let review = || {
        let mut settings = insta::Settings::clone_current();
        settings.set_snapshot_path(dir().join("snapshots"));
        settings.set_prepend_module_to_snapshot(false);
        settings.set_omit_expression(true);
        let name = format!("{}@{key}", case.name);
        settings.bind(|| insta::assert_snapshot!(name, text.clone()));
    };
    match verdict(&stored, numerics, &print, &text) {
        Verdict::Matches => Ok(()),
        Verdict::Twin(twin) => {
            eprintln!(
                "no fingerprint of {key}; the bits match the stored {}@{} (the same plan; arithmetic {} there, {} here)",
                case.name,
                twin.key,
                twin.field("arithmetic").unwrap_or("?"),
                numerics.arithmetic
            );
            Ok(())
        }
        Verdict::Changed => new_bits(
            case,
            &key,
            &print,
            "differ from its stored fingerprint",
            bless,
            review,
        ),
        Verdict::New => new_bits(case, &key, &print, "are new", bless, review),
    }
}

/// How a fingerprint compares with the stored ones of its case.
#[derive(Debug)]
enum Verdict<'a> {
    /// The stored fingerprint of its key says the same.
    Matches,
    /// None of its key, but one of the same family and plan has its bits.
    Twin(&'a Stored),
    /// The stored fingerprint of its key says something else.
    Changed,
    /// No stored fingerprint of its key, and none of its plan with its bits.
    New,
}

fn verdict<'a>(
    stored: &'a [Stored],
    numerics: &super::devices::Numerics,
    print: &Print,
    text: &str,
) -> Verdict<'a> {
    let key = numerics.key();
    if let Some(own) = stored.iter().find(|s| s.key == key) {
        return if own.text == text {
            Verdict::Matches
        } else {
            Verdict::Changed
        };
    }
    stored
        .iter()
        .filter(|s| s.key.split('-').next() == Some(numerics.family))
        .filter(|s| s.field("plan") == Some(numerics.plan.as_str()))
        .find(|s| s.field("bits_fnv1a") == Some(print.bits.as_str()))
        .map_or(Verdict::New, Verdict::Twin)
}

/// A fingerprint that no stored one matches: written when blessing, a failure in CI, insta's
/// review flow elsewhere.
fn new_bits(
    case: &Case,
    key: &str,
    print: &Print,
    what: &str,
    bless: bool,
    review: impl FnOnce(),
) -> Result<(), Failed> {
    if bless {
        review();
        eprintln!("wrote {}@{key}", case.name);
        return Ok(());
    }
    if std::env::var_os("CI").is_some() {
        return Err(format!(
            "{}@{key}: the output bits ({}, plan {}) {what}; CI writes no fingerprint; to accept \
             them: {ACCEPT}",
            case.name, print.bits, print.plan
        )
        .into());
    }
    // insta writes `{case}@{key}.snap.new` (INSTA_FORCE_PASS keeps it from panicking with its
    // own advice and a backtrace); the failure says what to do with it.
    review();
    Err(format!(
        "{}@{key}: the output bits ({}, plan {}) {what}; written to golden/snapshots/{}@{key}.snap.new \
         for review (cargo install cargo-insta; cargo insta review), or accept every new \
         fingerprint: {ACCEPT}",
        case.name, print.bits, print.plan, case.name
    )
    .into())
}

/// A fingerprint: the numerics it was made with, exact bits and rounded statistics.
struct Print {
    params: String,
    arithmetic: String,
    plan: String,
    outputs: usize,
    bits: String,
    stats: String,
}

impl Print {
    fn of(p: &Conv2dParams, numerics: &super::devices::Numerics, y: &[f32]) -> Self {
        let bits = y.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
            (h ^ u64::from(v.to_bits())).wrapping_mul(0x100_0000_01b3)
        });
        let sum: f64 = y.iter().map(|&v| f64::from(v)).sum();
        let abs: f64 = y.iter().map(|&v| f64::from(v).abs()).sum::<f64>() / y.len() as f64;
        let (min, max) = y
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        Self {
            params: p.to_string(),
            arithmetic: numerics.arithmetic.clone(),
            plan: numerics.plan.clone(),
            outputs: y.len(),
            bits: format!("{bits:016x}"),
            stats: format!("sum: {sum:.6e}\nmean_abs: {abs:.6e}\nmin: {min:.6e}\nmax: {max:.6e}\n"),
        }
    }

    fn text(&self, case: &str) -> String {
        format!(
            "case: {case}\nparams: {}\narithmetic: {}\nplan: {}\noutputs: {}\nbits_fnv1a: {}\n{}",
            self.params, self.arithmetic, self.plan, self.outputs, self.bits, self.stats
        )
    }
}

/// A fingerprint stored for a case: its key (from the file name) and its text.
#[derive(Debug)]
struct Stored {
    key: String,
    text: String,
}

impl Stored {
    /// The value of a `name: value` line.
    fn field(&self, name: &str) -> Option<&str> {
        self.text.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(": "))
        })
    }
}

/// Every fingerprint stored for `case` (`golden/snapshots/{case}@{key}.snap`; insta's header
/// dropped; pending `.snap.new` files are not stored ones).
fn stored_prints(case: &str) -> Result<Vec<Stored>, String> {
    let dir = dir().join("snapshots");
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let prefix = format!("{case}@");
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(key) = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".snap"))
        else {
            continue;
        };
        let raw = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        out.push(Stored {
            key: key.to_owned(),
            text: snapshot_body(&raw).to_owned(),
        });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// An insta snapshot file's contents without its `---` metadata header.
fn snapshot_body(raw: &str) -> &str {
    raw.strip_prefix("---\n")
        .and_then(|rest| rest.split_once("\n---\n"))
        .map_or(raw, |(_, body)| body)
}

#[cfg(test)]
mod tests {
    use super::super::devices::Numerics;
    use super::*;

    /// A key's own fingerprint decides; without one, only the same family, plan and bits pass.
    #[test]
    fn verdicts() {
        let numerics = |arithmetic: &str, plan: &str| Numerics {
            family: "gpu",
            arithmetic: arithmetic.into(),
            plan: plan.into(),
        };
        let p = Conv2dParams::new(1, 1, 2, 2, 1, 1, 1);
        let (y, z) = ([1.0f32, 2.0, 3.0, 4.0], [1.0f32, 2.0, 3.0, 4.5]);
        let (fma, mul) = (numerics("fma", "direct-a"), numerics("mul-add", "direct-a"));
        let stored_of = |n: &Numerics, y: &[f32]| Stored {
            key: n.key(),
            text: Print::of(&p, n, y).text("c"),
        };
        let stored = vec![stored_of(&fma, &y)];
        let check = |n: &Numerics, y: &[f32]| {
            let print = Print::of(&p, n, y);
            format!("{:?}", verdict(&stored, n, &print, &print.text("c")))
        };
        assert_eq!(check(&fma, &y), "Matches");
        assert_eq!(check(&fma, &z), "Changed");
        assert!(check(&mul, &y).starts_with("Twin"), "{}", check(&mul, &y));
        assert_eq!(check(&mul, &z), "New");
        // Another plan (a forced tile: another summation order) never borrows a fingerprint.
        assert_eq!(check(&numerics("mul-add", "direct-b"), &y), "New");
        let cpu = Numerics {
            family: "cpu",
            ..mul.clone()
        };
        assert_eq!(check(&cpu, &y), "New", "families do not mix");
    }

    #[test]
    fn snapshot_bodies_and_fields() {
        let raw =
            "---\nsource: src/validate/golden.rs\n---\ncase: a\nplan: direct-x\nbits_fnv1a: 00ff\n";
        let s = Stored {
            key: "gpu-fma_direct-x".into(),
            text: snapshot_body(raw).into(),
        };
        assert_eq!(s.field("plan"), Some("direct-x"));
        assert_eq!(s.field("bits_fnv1a"), Some("00ff"));
        assert_eq!(s.field("case"), Some("a"));
        assert_eq!(s.field("bits"), None);
        assert_eq!(snapshot_body("case: b\n"), "case: b\n");
    }
}
