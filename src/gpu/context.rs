//! The headless OpenGL context: EGL devices through glutin, an OpenGL 4.3 core context made
//! current with no surface, and the capability probe.
//!
//! Which device: `SPORKLE_GPU=off` (none), `software` (Mesa's llvmpipe, for testing), an index
//! into the EGL device list, or unset/`auto` (a hardware device if there is one, else the
//! software one). When no usable GPU exists, [`GlContext::create`] says why (no libEGL, no
//! device, version too old, a missing extension) and the rest of sporkle works on the CPU.
//! The context is current on the thread that created it; the GPU backend owns that thread.

use crate::error::{Error, Result};
use glow::HasContext;
use glutin::api::egl::config::Config;
use glutin::api::egl::context::{NotCurrentContext, PossiblyCurrentContext};
use glutin::api::egl::device::Device;
use glutin::api::egl::display::Display;
use glutin::config::{Api, ConfigSurfaceTypes, ConfigTemplateBuilder};
use glutin::context::{ContextApi, ContextAttributesBuilder, GlProfile, Version};
use glutin::prelude::*;
use std::rc::Rc;

/// Which EGL device to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuChoice {
    /// No GPU.
    Off,
    /// A hardware device if there is one, else the software one.
    Auto,
    /// The software device (Mesa's llvmpipe): correct, and slow.
    Software,
    /// The n-th EGL device.
    Index(usize),
}

impl GpuChoice {
    /// From `SPORKLE_GPU` (unset means `auto`).
    pub fn from_env() -> Result<Self> {
        match std::env::var("SPORKLE_GPU").as_deref() {
            Err(_) | Ok("") | Ok("auto") => Ok(GpuChoice::Auto),
            Ok("off") => Ok(GpuChoice::Off),
            Ok("software") => Ok(GpuChoice::Software),
            Ok(v) => v.parse().map(GpuChoice::Index).map_err(|_| {
                Error::DeviceUnavailable(format!(
                    "SPORKLE_GPU={v:?}: expected off, auto, software or a device index"
                ))
            }),
        }
    }
}

/// What the GPU is and offers.
#[derive(Clone, Debug)]
pub struct GpuInfo {
    /// `GL_RENDERER`.
    pub renderer: String,
    /// `GL_VENDOR`.
    pub vendor: String,
    /// `GL_VERSION`.
    pub version: String,
    /// Whether this is a software renderer (llvmpipe): correct, and never fast.
    pub software: bool,
    /// The extensions sporkle uses, and whether each is present.
    pub extensions: Vec<(&'static str, bool)>,
    /// `GL_MAX_COMPUTE_SHARED_MEMORY_SIZE`, bytes.
    pub max_shared_memory: i32,
    /// `GL_MAX_SHADER_STORAGE_BLOCK_SIZE`, bytes.
    pub max_storage_block: i64,
    /// `GL_MAX_COMPUTE_WORK_GROUP_INVOCATIONS`.
    pub max_invocations: i32,
    /// `GL_MAX_COMPUTE_WORK_GROUP_COUNT` per axis.
    pub max_groups: [i32; 3],
    /// `GL_SHADER_STORAGE_BUFFER_OFFSET_ALIGNMENT`, bytes: where a bound range may start.
    pub storage_offset_alignment: i32,
}

/// Extensions sporkle looks for (used where present).
const EXTENSIONS: [&str; 4] = [
    "GL_ARB_buffer_storage",
    "GL_KHR_shader_subgroup",
    "GL_ARB_gpu_shader_int64",
    "GL_NV_shader_thread_shuffle",
];

/// A current OpenGL context and what it offers. Not `Send`: it lives on its creating thread.
pub struct GlContext {
    /// The GL functions (shared with every RAII object, which deletes itself through them).
    pub gl: Rc<glow::Context>,
    /// The probe's findings.
    pub info: GpuInfo,
    // Dropped after `gl` users: the context, then the display.
    context: PossiblyCurrentContext,
    config: Config,
    display: Display,
}

/// A context sharing objects (buffers, programs, fences) with a [`GlContext`], not yet current
/// anywhere: made on the owner's thread, sent to another, made current there
/// ([`SharedContext::make_current`]). For work that must run in its own GL context, such as
/// transfers next to compute.
pub struct SharedContext {
    context: NotCurrentContext,
    config: Config,
    display: Display,
    software: bool,
}

impl SharedContext {
    /// Makes the context current on this thread (with no surface) and loads its functions.
    pub fn make_current(self) -> Result<GlContext> {
        let context = self
            .context
            .make_current_surfaceless()
            .map_err(|e| unavailable(format!("cannot make a shared context current: {e}")))?;
        GlContext::finish(context, self.config, self.display, self.software)
    }
}

fn unavailable(why: impl Into<String>) -> Error {
    Error::DeviceUnavailable(why.into())
}

impl GlContext {
    /// Creates the context for `choice` and makes it current on this thread.
    pub fn create(choice: GpuChoice) -> Result<Self> {
        if choice == GpuChoice::Off {
            return Err(unavailable("SPORKLE_GPU=off"));
        }
        let devices: Vec<Device> = Device::query_devices()
            .map_err(|e| {
                unavailable(format!(
                    "cannot enumerate EGL devices (is libEGL.so.1 installed?): {e}"
                ))
            })?
            .collect();
        if devices.is_empty() {
            return Err(unavailable("EGL lists no device"));
        }
        let is_software = |d: &Device| d.extensions().contains("EGL_MESA_device_software");
        let device = match choice {
            GpuChoice::Index(i) => devices.get(i).ok_or_else(|| {
                unavailable(format!(
                    "SPORKLE_GPU={i}: only {} EGL devices",
                    devices.len()
                ))
            })?,
            GpuChoice::Software => devices
                .iter()
                .find(|d| is_software(d))
                .ok_or_else(|| unavailable("SPORKLE_GPU=software: no software EGL device"))?,
            GpuChoice::Auto | GpuChoice::Off => devices
                .iter()
                .find(|d| !is_software(d))
                .unwrap_or(&devices[0]),
        };
        // SAFETY: no raw display handle is passed (None), which with_device documents as valid.
        let display = unsafe { Display::with_device(device, None) }
            .map_err(|e| unavailable(format!("cannot open an EGL display on the device: {e}")))?;
        let template = ConfigTemplateBuilder::new()
            .with_surface_type(ConfigSurfaceTypes::empty())
            .with_api(Api::OPENGL)
            .build();
        // SAFETY: the display is valid and outlives the configs found on it (both live here).
        let config = unsafe { display.find_configs(template) }
            .map_err(|e| unavailable(format!("no EGL config without surface for OpenGL: {e}")))?
            .next()
            .ok_or_else(|| unavailable("no EGL config without surface for OpenGL"))?;
        let context = new_context(&display, &config, None)?
            .make_current_surfaceless()
            .map_err(|e| {
                unavailable(format!(
                    "cannot make the context current without a surface: {e}"
                ))
            })?;
        Self::finish(context, config, display, is_software(device))
    }

    /// The address of GL function `name` (null if the driver lacks it), for the extension
    /// functions glow does not wrap.
    pub fn proc_address(&self, name: &std::ffi::CStr) -> *const std::ffi::c_void {
        self.display.get_proc_address(name)
    }

    /// A new context that shares this one's objects, to be made current on another thread.
    pub fn shared(&self) -> Result<SharedContext> {
        Ok(SharedContext {
            context: new_context(&self.display, &self.config, Some(&self.context))?,
            config: self.config.clone(),
            display: self.display.clone(),
            software: self.info.software,
        })
    }

    /// Loads the functions of `context`, current on this thread, and probes it.
    fn finish(
        context: PossiblyCurrentContext,
        config: Config,
        display: Display,
        software: bool,
    ) -> Result<Self> {
        // SAFETY: the context is current on this thread, and the loader returns its functions.
        let gl = unsafe {
            glow::Context::from_loader_function_cstr(|name| display.get_proc_address(name).cast())
        };
        let info = probe(&gl, software)?;
        Ok(Self {
            gl: Rc::new(gl),
            info,
            context,
            config,
            display,
        })
    }
}

impl Drop for GlContext {
    /// Releases the context from this thread first: EGL defers destroying a context that is
    /// current somewhere, and a thread that exits does not release it (a leak per context).
    fn drop(&mut self) {
        let _ = self.context.make_not_current_in_place();
    }
}

/// An OpenGL 4.3 core context on `display`, sharing objects with `share` if given.
fn new_context(
    display: &Display,
    config: &Config,
    share: Option<&PossiblyCurrentContext>,
) -> Result<NotCurrentContext> {
    let builder = ContextAttributesBuilder::new()
        .with_profile(GlProfile::Core)
        .with_context_api(ContextApi::OpenGl(Some(Version::new(4, 3))));
    let attributes = match share {
        Some(c) => builder.with_sharing(c).build(None),
        None => builder.build(None),
    };
    // SAFETY: config comes from this display; no window handle is involved.
    unsafe { display.create_context(config, &attributes) }
        .map_err(|e| unavailable(format!("cannot create an OpenGL 4.3 core context: {e}")))
}

fn probe(gl: &glow::Context, software: bool) -> Result<GpuInfo> {
    // SAFETY: plain queries on the current context.
    let (major, minor, renderer, vendor, version) = unsafe {
        (
            gl.get_parameter_i32(glow::MAJOR_VERSION),
            gl.get_parameter_i32(glow::MINOR_VERSION),
            gl.get_parameter_string(glow::RENDERER),
            gl.get_parameter_string(glow::VENDOR),
            gl.get_parameter_string(glow::VERSION),
        )
    };
    if (major, minor) < (4, 3) {
        return Err(unavailable(format!(
            "OpenGL {major}.{minor} on {renderer}: compute shaders need 4.3"
        )));
    }
    let present = gl.supported_extensions();
    let extensions = EXTENSIONS
        .iter()
        .map(|&e| (e, present.contains(e)))
        .collect();
    // SAFETY: plain queries on the current context.
    let info = unsafe {
        GpuInfo {
            renderer,
            vendor,
            version,
            software,
            extensions,
            max_shared_memory: gl.get_parameter_i32(glow::MAX_COMPUTE_SHARED_MEMORY_SIZE),
            max_storage_block: gl.get_parameter_i64(glow::MAX_SHADER_STORAGE_BLOCK_SIZE),
            max_invocations: gl.get_parameter_i32(glow::MAX_COMPUTE_WORK_GROUP_INVOCATIONS),
            max_groups: [0, 1, 2]
                .map(|i| gl.get_parameter_indexed_i32(glow::MAX_COMPUTE_WORK_GROUP_COUNT, i)),
            storage_offset_alignment: gl
                .get_parameter_i32(glow::SHADER_STORAGE_BUFFER_OFFSET_ALIGNMENT),
        }
    };
    Ok(info)
}

impl std::fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "gpu: {} ({}){}",
            self.renderer,
            self.vendor,
            if self.software {
                " [software: for testing only]"
            } else {
                ""
            }
        )?;
        writeln!(f, "  OpenGL: {}", self.version)?;
        let ext: Vec<String> = self
            .extensions
            .iter()
            .map(|(e, p)| format!("{e}{}", if *p { "" } else { " (absent)" }))
            .collect();
        writeln!(f, "  extensions: {}", ext.join(", "))?;
        writeln!(
            f,
            "  limits: shared memory {} KiB per workgroup, storage block {} MiB, {} invocations per workgroup, workgroups {:?}",
            self.max_shared_memory / 1024,
            self.max_storage_block >> 20,
            self.max_invocations,
            self.max_groups
        )
    }
}
