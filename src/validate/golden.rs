//! Golden trials: cases computed by an independent producer (onnxruntime, through
//! `golden/make_golden.py`, versions in `golden/cases/manifest.json`), which every device,
//! the reference included, must match; and fingerprint trials: an insta snapshot per case and
//! numerics key (`golden/snapshots/`) of a device's exact output bits and rounded statistics,
//! so a kernel change that moves numerics shows up as a diff to review (`cargo insta review`,
//! or `SPORKLE_BLESS=1` to accept). CI never writes them: a missing or changed one fails.

use super::{fail, trial, Context, Device};
use crate::reference::{self, OutIndex, RefValue};
use crate::suite::Case;
use crate::tolerance::{compare_points, Tolerance};
use crate::{npy, Conv2dParams, Error};
use libtest_mimic::{Failed, Trial};
use serde::Deserialize;
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
    crate::repo_root().join("golden")
}

fn load(case: &Case) -> crate::Result<Loaded> {
    let p = case.params;
    p.validate()?;
    let d = dir().join("cases").join(&case.name);
    let (ho, wo) = p.out_hw();
    let read = |file: &str, shape: Vec<usize>| -> crate::Result<Vec<f32>> {
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

pub fn trials(ctx: &Arc<Context>) -> crate::Result<Vec<Trial>> {
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
        }
    }
    Ok(out)
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

/// Exact bits (FNV-1a over every output) and rounded statistics, as an insta snapshot.
fn fingerprint(case: &Case, device: &Device) -> Result<(), Failed> {
    let g = load(case).map_err(fail)?;
    let y = device
        .conv2d(&g.p, &g.x, &g.w, g.b.as_deref())
        .map_err(fail)?;
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
    let text = format!(
        "case: {}\nparams: {}\noutputs: {}\nbits_fnv1a: {bits:016x}\nsum: {sum:.6e}\nmean_abs: {abs:.6e}\nmin: {min:.6e}\nmax: {max:.6e}\n",
        case.name,
        g.p,
        y.len()
    );
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(dir().join("snapshots"));
    settings.set_prepend_module_to_snapshot(false);
    settings.set_omit_expression(true);
    let name = format!("{}@{}", case.name, device.numerics_key());
    settings.bind(|| insta::assert_snapshot!(name, text));
    Ok(())
}
