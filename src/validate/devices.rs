//! The devices the harness validates, each a trial kind: the reference, the CPU backend as it
//! runs by default, the CPU backend with the portable microkernel, the GPU (a hardware one, or
//! Mesa's llvmpipe where that is all there is) through its synchronous path (`gpu`) and through
//! the Juggler's async executor (`gpu-async`, which must give the same bits), and the Juggler
//! choosing for itself (`juggler`). New backends add a variant here and every trial family
//! picks them up.

use crate::cpu::Microkernel;
use crate::gpu::{GpuBackend, GpuChoice};
use crate::juggler::{Config, DeviceKind, Juggler, Preference};
use crate::{reference, Conv2dParams, CpuBackend, Error, Result};
use std::sync::Arc;

/// One device under validation.
#[derive(Clone)]
pub enum Device {
    /// The naive oracle (golden trials only: it is what the others are compared with).
    Reference,
    /// The CPU backend.
    Cpu {
        /// Shared by every trial of this device.
        backend: Arc<CpuBackend>,
        /// Whether this is the portable-microkernel variant.
        portable: bool,
    },
    /// The GPU backend.
    Gpu {
        /// Shared by every trial of this device.
        backend: Arc<GpuBackend>,
    },
    /// The GPU through a Juggler that prefers it, async on: submit, then wait. A job that fell
    /// back to the CPU is a failure here (it would hide a GPU fault).
    GpuAsync {
        /// Shared by every trial of this device.
        juggler: Arc<Juggler>,
        /// The GPU's renderer (for the numerics key: the same kernels as `gpu`).
        renderer: String,
    },
    /// A Juggler choosing the device per call.
    Juggler {
        /// Shared by every trial of this device.
        juggler: Arc<Juggler>,
    },
}

/// A Juggler for the harness: `threads` CPU threads, the GPU of `gpu`.
fn juggler(preference: Preference, gpu: GpuChoice, threads: usize) -> Result<Juggler> {
    Juggler::with_config(Config {
        preference,
        gpu: Some(gpu),
        cpu_threads: Some(threads),
        ..Config::default()
    })
}

impl Device {
    /// The devices of this machine, and why there is no `[gpu]` among them (`None` when there is).
    pub fn all() -> (Vec<Device>, Option<String>) {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(4);
        let mut all = vec![Device::Reference];
        match CpuBackend::with_threads(threads) {
            Ok(b) => all.push(Device::Cpu {
                backend: Arc::new(b),
                portable: false,
            }),
            Err(e) => eprintln!("sporkle-validate: no [cpu] device: {e}"),
        }
        if Microkernel::detect() != Microkernel::Portable {
            if let Ok(b) = CpuBackend::with_options(threads, Microkernel::Portable) {
                all.push(Device::Cpu {
                    backend: Arc::new(b),
                    portable: true,
                });
            }
        }
        let gpu_absence = match GpuBackend::new() {
            Ok(b) => {
                let (choice, renderer) = (b.choice(), b.info().renderer.clone());
                all.push(Device::Gpu {
                    backend: Arc::new(b),
                });
                match juggler(Preference::Gpu, choice, threads) {
                    Ok(j) => all.push(Device::GpuAsync {
                        juggler: Arc::new(j),
                        renderer,
                    }),
                    Err(e) => eprintln!("sporkle-validate: no [gpu-async] device: {e}"),
                }
                None
            }
            Err(e) => {
                eprintln!("sporkle-validate: no [gpu] device: {e}");
                Some(e.to_string())
            }
        };
        let choice = if gpu_absence.is_some() {
            GpuChoice::Off
        } else {
            GpuChoice::from_env().unwrap_or(GpuChoice::Off)
        };
        match juggler(Preference::Auto, choice, threads) {
            Ok(j) => all.push(Device::Juggler {
                juggler: Arc::new(j),
            }),
            Err(e) => eprintln!("sporkle-validate: no [juggler] device: {e}"),
        }
        (all, gpu_absence)
    }

    /// The trial kind: `reference`, `cpu`, `cpu-portable`.
    pub fn kind(&self) -> &'static str {
        match self {
            Device::Reference => "reference",
            Device::Cpu {
                portable: false, ..
            } => "cpu",
            Device::Cpu { portable: true, .. } => "cpu-portable",
            Device::Gpu { .. } => "gpu",
            Device::GpuAsync { .. } => "gpu-async",
            Device::Juggler { .. } => "juggler",
        }
    }

    /// What determines this device's exact numerics (fingerprints are kept per key):
    /// `reference`, `cpu-avx512`, `cpu-portable`.
    pub fn numerics_key(&self) -> String {
        match self {
            Device::Reference => "reference".into(),
            Device::Cpu { backend, .. } => format!("cpu-{}", backend.microkernel().name()),
            Device::Gpu { backend } => format!("gpu-{}", slug(&backend.info().renderer)),
            Device::GpuAsync { renderer, .. } => format!("gpu-{}", slug(renderer)),
            // Its numerics are those of whichever device it picks.
            Device::Juggler { .. } => "juggler".into(),
        }
    }

    /// Whether its exact bits are fixed (a fingerprint can be kept).
    pub fn has_fixed_numerics(&self) -> bool {
        !matches!(self, Device::Juggler { .. })
    }

    /// The Juggler behind this device, if it is one.
    pub fn juggler(&self) -> Option<&Arc<Juggler>> {
        match self {
            Device::GpuAsync { juggler, .. } | Device::Juggler { juggler } => Some(juggler),
            _ => None,
        }
    }

    /// Whether this is a backend under test (the reference is the oracle).
    pub fn is_backend(&self) -> bool {
        !matches!(self, Device::Reference)
    }

    /// Creates a fresh instance of this device's backend (leak trials create and drop them).
    pub fn fresh(&self) -> Result<Device> {
        Ok(match self {
            Device::Reference => Device::Reference,
            Device::Cpu { backend, portable } => Device::Cpu {
                backend: Arc::new(CpuBackend::with_options(
                    backend.threads(),
                    backend.microkernel(),
                )?),
                portable: *portable,
            },
            Device::Gpu { backend } => Device::Gpu {
                backend: Arc::new(GpuBackend::with_choice(backend.choice())?),
            },
            Device::GpuAsync { renderer, .. } => Device::GpuAsync {
                juggler: Arc::new(juggler(Preference::Gpu, GpuChoice::from_env()?, 2)?),
                renderer: renderer.clone(),
            },
            Device::Juggler { .. } => Device::Juggler {
                juggler: Arc::new(juggler(Preference::Auto, GpuChoice::from_env()?, 2)?),
            },
        })
    }

    /// Runs one convolution and returns the output.
    pub fn conv2d(
        &self,
        p: &Conv2dParams,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        match self {
            Device::Reference => reference::conv2d(p, x, w, b),
            Device::Cpu { backend, .. } => {
                let mut y = vec![0.0; p.output_len() as usize];
                backend.conv2d(p, x, w, b, &mut y)?;
                Ok(y)
            }
            Device::Gpu { backend } => {
                let mut y = vec![0.0; p.output_len() as usize];
                backend.conv2d(p, x, w, b, &mut y)?;
                Ok(y)
            }
            Device::GpuAsync { juggler, .. } => {
                let (y, info) = juggler.submit(p, x, w, b)?.wait()?;
                match (info.device, info.fallback) {
                    (DeviceKind::Gpu, None) => Ok(y),
                    (d, fallback) => Err(Error::Gpu(format!(
                        "ran on {d}, not the GPU: {}",
                        fallback.unwrap_or(info.reason)
                    ))),
                }
            }
            Device::Juggler { juggler } => {
                let mut y = vec![0.0; p.output_len() as usize];
                juggler.conv2d(p, x, w, b, &mut y)?;
                Ok(y)
            }
        }
    }

    /// Whether this device is a software stand-in for real hardware (llvmpipe): correct, never
    /// fast, so only small shapes run on it.
    pub fn is_software(&self) -> bool {
        match self {
            Device::Gpu { backend } => backend.info().software,
            Device::GpuAsync { juggler, .. } => juggler.gpu_is_software(),
            _ => false,
        }
    }
}

/// Lower-case letters and digits of `s`, other runs as single dashes.
pub fn slug(s: &str) -> String {
    let raw: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    raw.split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}
