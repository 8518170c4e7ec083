//! The Juggler's cost model: measured times per shape and device, and rates calibrated on
//! first use and refined by every job (see the parent module's docs for the choice it feeds).

use super::DeviceKind;
use crate::gpu::StreamDone;
use crate::params::Conv2dParams;
use std::collections::HashMap;

/// A shape measured on one device is tried once on the other when the model predicts it at most
/// this many times slower: the model's GPU terms come from other shapes and can be several times
/// off for one (on the H100, with 2× here, `l3_3x3_14_256_n32` never tried the GPU, where it ran
/// 1.6× faster than on the CPU).
pub(super) const EXPLORE: f64 = 4.0;
/// A slower device measured on a shape is run once again every this many choices for the shape,
/// times the ratio of its time to the faster's ([`remeasure_period`]).
pub(super) const REMEASURE: u32 = 64;

/// Choices between re-runs of a device measured `ratio` times slower than the other: the
/// re-runs then cost at most 1/[`REMEASURE`] of the faster device's time.
pub(super) fn remeasure_period(ratio: f64) -> u32 {
    let ratio = if ratio.is_finite() {
        ratio.max(1.0)
    } else {
        1e6
    };
    (f64::from(REMEASURE) * ratio.ceil()).min(f64::from(u32::MAX)) as u32
}
/// Moving average weight of a new observation.
const EWMA: f64 = 0.3;
/// The calibration convolution: 231 MFLOP, a ResNet-style 3×3 layer.
pub(super) const CALIBRATION: Conv2dParams = Conv2dParams {
    n: 1,
    c_in: 64,
    h: 56,
    w: 56,
    c_out: 64,
    k_h: 3,
    k_w: 3,
    stride: (1, 1),
    padding: (1, 1),
    padding_end: (1, 1),
    dilation: (1, 1),
    groups: 1,
};

pub(super) fn ewma(old: &mut Option<f64>, new: f64) {
    *old = Some(old.map_or(new, |o| o + EWMA * (new - o)));
}

/// The cost model (see the module docs).
#[derive(Debug, Default)]
pub(super) struct Model {
    pub(super) calibrated: bool,
    /// Rates fixed by the configuration: jobs do not refine them.
    pub(super) fixed: bool,
    /// CPU compute rate, FLOP/s.
    pub(super) cpu_rate: Option<f64>,
    /// GPU kernel rate, FLOP/s.
    pub(super) gpu_rate: Option<f64>,
    /// GPU transfer rates (host copy and GPU copy together), bytes/s.
    pub(super) up_rate: Option<f64>,
    pub(super) down_rate: Option<f64>,
    /// What a GPU call costs beyond the model's terms, seconds.
    pub(super) gpu_overhead: Option<f64>,
    /// Measured wall times per shape.
    pub(super) shapes: HashMap<Conv2dParams, ShapeTimes>,
}

/// What the Juggler has measured of one shape, per device `[cpu, gpu]`.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct ShapeTimes {
    /// Moving average of the wall time, seconds, from the second call on: a device's first
    /// call of a shape allocates workspaces, compiles programs and uploads weights.
    pub(super) time: [Option<f64>; 2],
    pub(super) calls: [u32; 2],
    /// Choices made for the shape (to re-measure the slower device now and then).
    pub(super) choices: u32,
}

impl ShapeTimes {
    /// Records a call; false for a warm-up (the first), which measures nothing.
    pub(super) fn record(&mut self, d: DeviceKind, wall_s: f64) -> bool {
        let i = d as usize;
        self.calls[i] += 1;
        if self.calls[i] > 1 {
            ewma(&mut self.time[i], wall_s);
        }
        self.calls[i] > 1
    }
}

impl Model {
    pub(super) fn predict(&self, p: &Conv2dParams, d: DeviceKind) -> Option<f64> {
        let flops = p.flops() as f64;
        match d {
            DeviceKind::Cpu => Some(flops / self.cpu_rate?),
            DeviceKind::Gpu => Some(
                self.gpu_overhead.unwrap_or(0.0)
                    + (p.input_len() * 4) as f64 / self.up_rate?
                    + flops / self.gpu_rate?
                    + (p.output_len() * 4) as f64 / self.down_rate?,
            ),
        }
    }

    pub(super) fn observe_cpu(&mut self, p: &Conv2dParams, wall_s: f64) {
        let measured = self
            .shapes
            .entry(*p)
            .or_default()
            .record(DeviceKind::Cpu, wall_s);
        if measured && !self.fixed {
            ewma(&mut self.cpu_rate, p.flops() as f64 / wall_s.max(1e-9));
        }
    }

    pub(super) fn observe_gpu(
        &mut self,
        p: &Conv2dParams,
        wall_s: f64,
        done: &StreamDone,
        host_out_s: f64,
        sync: bool,
    ) {
        // Only whole-call times (not pipelined ones) say what one call costs; a shape's first
        // GPU call (program compiled, weights uploaded) teaches the model nothing.
        let shape = self.shapes.entry(*p).or_default();
        let measured = if sync {
            shape.record(DeviceKind::Gpu, wall_s)
        } else {
            shape.calls[DeviceKind::Gpu as usize] > 0
        };
        if !measured || self.fixed {
            return;
        }
        if let Some(ns) = done.kernel_ns {
            ewma(
                &mut self.gpu_rate,
                p.flops() as f64 / (ns as f64 * 1e-9).max(1e-9),
            );
        } else {
            // No timers (software renderer): the whole GPU wall time is compute.
            ewma(
                &mut self.gpu_rate,
                p.flops() as f64 / done.gpu_wall_s.max(1e-9),
            );
        }
        let up_s = done.host_in_s + done.upload_ns.map_or(0.0, |ns| ns as f64 * 1e-9);
        let down_s = host_out_s + done.download_ns.map_or(0.0, |ns| ns as f64 * 1e-9);
        ewma(&mut self.up_rate, done.bytes_up as f64 / up_s.max(1e-9));
        ewma(
            &mut self.down_rate,
            done.bytes_down as f64 / down_s.max(1e-9),
        );
        if sync {
            let parts =
                self.predict(p, DeviceKind::Gpu).unwrap_or(0.0) - self.gpu_overhead.unwrap_or(0.0);
            ewma(&mut self.gpu_overhead, (wall_s - parts).max(0.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The re-measuring period grows with the loser's ratio, so that what the re-runs cost
    /// (the ratio over the period, in units of the faster device's time) stays at or under
    /// 1/64; a ratio that is not a number re-runs rarely, never in a tight loop.
    #[test]
    fn remeasuring_costs_at_most_a_64th() {
        assert_eq!(remeasure_period(1.0), 64);
        assert_eq!(remeasure_period(1.2), 128);
        assert_eq!(remeasure_period(3.4), 256);
        for ratio in [1.0, 1.01, 1.5, 2.0, 3.4, 17.0, 1e3, 1e7] {
            let period = remeasure_period(ratio);
            assert!(
                ratio / f64::from(period) <= 1.0 / 64.0 + 1e-12,
                "{ratio}: {period}"
            );
        }
        assert!(remeasure_period(f64::NAN) >= 64 * 1_000_000);
        assert!(remeasure_period(f64::INFINITY) >= 64 * 1_000_000);
    }

    /// A prediction is the model's terms, each counted in its own unit: a GPU call's bytes
    /// (4 per float) over the transfer rates, its FLOPs over the kernel rate, plus the fixed
    /// cost; a CPU call's FLOPs over the CPU rate. Rates that are not round numbers, so a
    /// factor lost or added anywhere changes the result.
    #[test]
    fn predictions_count_bytes_flops_and_the_fixed_cost() {
        let p = Conv2dParams::new(2, 3, 10, 12, 5, 3, 3).with_padding(1, 1);
        let m = Model {
            cpu_rate: Some(3.0e9),
            gpu_rate: Some(7.0e11),
            up_rate: Some(1.1e10),
            down_rate: Some(1.3e10),
            gpu_overhead: Some(2.5e-5),
            ..Model::default()
        };
        let flops = p.flops() as f64;
        let cpu = m.predict(&p, DeviceKind::Cpu).unwrap();
        approx::assert_relative_eq!(cpu, flops / 3.0e9, max_relative = 1e-12);
        let bytes_in = (p.input_len() * 4) as f64;
        let bytes_out = (p.output_len() * 4) as f64;
        let gpu = m.predict(&p, DeviceKind::Gpu).unwrap();
        let want = 2.5e-5 + bytes_in / 1.1e10 + flops / 7.0e11 + bytes_out / 1.3e10;
        approx::assert_relative_eq!(gpu, want, max_relative = 1e-12);
        // Without a measured transfer rate there is no GPU prediction.
        let unknown = Model { up_rate: None, ..m };
        assert_eq!(unknown.predict(&p, DeviceKind::Gpu), None);
    }
}
