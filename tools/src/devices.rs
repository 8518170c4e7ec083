//! The devices the harness validates, each a trial kind: the reference, the CPU backend as it
//! runs by default, the CPU backend with the portable microkernel, the GPU (a hardware one, or
//! Mesa's llvmpipe where that is all there is) through its synchronous path (`gpu`) and through
//! the Juggler's async executor (`gpu-async`, which must give the same bits), and the Juggler
//! choosing for itself (`juggler`). New backends add a variant here and every trial family
//! picks them up.

use sporkle::cpu::Microkernel;
use sporkle::gpu::{GpuBackend, GpuChoice};
use sporkle::juggler::{Config, DeviceKind, Juggler, Preference};
use sporkle::{reference, Conv2dParams, CpuBackend, Error, Result};
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
        /// The `[gpu]` device's backend, on the same GPU: it answers what the executor's plans
        /// and arithmetic are (the same kernels, planned by the same code), for the numerics key.
        same_gpu: Arc<GpuBackend>,
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
                let (choice, backend) = (b.choice(), Arc::new(b));
                all.push(Device::Gpu {
                    backend: Arc::clone(&backend),
                });
                match juggler(Preference::Gpu, choice, threads) {
                    Ok(j) => all.push(Device::GpuAsync {
                        juggler: Arc::new(j),
                        same_gpu: backend,
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

    /// What determines this device's output bits for a case (fingerprints are keyed by it),
    /// or `None` where they are not fixed (the Juggler picks a device per call). Measured or
    /// derived, never a name: the CPU's microkernel and path; the GPU's arithmetic class
    /// (probed, see [`sporkle::gpu::arithmetic`]) and the plan it runs.
    pub fn numerics(&self, p: &Conv2dParams, bias: bool) -> Result<Option<Numerics>> {
        if let Some(b) = self.gpu_backend() {
            return Ok(Some(Numerics {
                family: "gpu",
                arithmetic: b.arithmetic()?.name(),
                plan: b.plan_info(p, bias)?.key(),
            }));
        }
        Ok(match self {
            Device::Reference => Some(Numerics {
                family: "reference",
                arithmetic: "f64".into(),
                plan: "naive".into(),
            }),
            Device::Cpu { backend, .. } => Some(Numerics {
                family: "cpu",
                arithmetic: backend.microkernel().numerics().into(),
                plan: backend.path_for(p).name().into(),
            }),
            Device::Gpu { .. } | Device::GpuAsync { .. } | Device::Juggler { .. } => None,
        })
    }

    /// The GPU backend whose kernels this device runs: the `[gpu]` device's own, or for
    /// `[gpu-async]` the same GPU's (its plans and arithmetic are the executor's).
    pub fn gpu_backend(&self) -> Option<&Arc<GpuBackend>> {
        match self {
            Device::Gpu { backend } => Some(backend),
            Device::GpuAsync { same_gpu, .. } => Some(same_gpu),
            _ => None,
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
            Device::GpuAsync { same_gpu, .. } => Device::GpuAsync {
                juggler: Arc::new(juggler(Preference::Gpu, GpuChoice::from_env()?, 2)?),
                same_gpu: Arc::clone(same_gpu),
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
                let mut y = vec![0.0; p.output_len()];
                backend.conv2d(p, x, w, b, &mut y)?;
                Ok(y)
            }
            Device::Gpu { backend } => {
                let mut y = vec![0.0; p.output_len()];
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
                let mut y = vec![0.0; p.output_len()];
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

/// What fixes a device's output bits for one case: the name of its fingerprints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Numerics {
    /// `reference`, `cpu` or `gpu`.
    pub family: &'static str,
    /// How it rounds: the CPU's microkernel numerics (`avx512` for both AVX-512 variants,
    /// `portable`), the GPU's measured class
    /// (`fma-ftz`, `mul-add`, ...).
    pub arithmetic: String,
    /// The order it sums in: the CPU's path, the GPU's plan ([`sporkle::gpu::PlanInfo::key`]).
    pub plan: String,
}

impl Numerics {
    /// The key: `gpu-fma-ftz_direct-tiled-64x64x16-4x4-split1-passes1`, `cpu-avx512_rows`;
    /// the reference's is `reference`.
    pub fn key(&self) -> String {
        if self.family == "reference" {
            return "reference".into();
        }
        format!("{}-{}_{}", self.family, self.arithmetic, self.plan)
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
