//! Device memory that GL and CUDA share, allocated by Vulkan (the streaming executor's CUDA
//! copies, `cu.rs`).
//!
//! GL cannot export its buffers, and CUDA cannot hand its memory to GL, but both import memory
//! that Vulkan exports as an opaque file descriptor. This module opens a Vulkan device on the
//! same GPU as the GL context (matched by device UUID), allocates device memory exportable as
//! an fd, imports it into GL (`GL_EXT_memory_object_fd`, bound to a GL storage buffer) and
//! exports it again for CUDA ([`SharedBuffer::export_fd`]). The Vulkan loader is opened at run
//! time (`ash`'s `loaded` feature), so machines without one simply have no shared memory.
//! (Vulkan's own transfer queues reached 58 GB/s both ways together as the copy path, where
//! CUDA's copy engines reach 99: `docs/experiments.md`.)
//!
//! Ordering between the APIs is the user's (see `cu.rs`). Vulkan and the GL extension
//! functions are C APIs, so this file is on tidy's list of files that may hold `unsafe`; every
//! block says why it is sound.

use super::context::GlContext;
use super::gl::{self, Buffer};
use crate::error::{Error, Result};
use ash::vk;
use std::ffi::{c_void, CStr};
use std::rc::Rc;
use std::sync::{Arc, Mutex};

/// `GL_HANDLE_TYPE_OPAQUE_FD_EXT`.
const GL_HANDLE_TYPE_OPAQUE_FD: u32 = 0x9586;
/// `GL_DEDICATED_MEMORY_OBJECT_EXT`.
const GL_DEDICATED_MEMORY_OBJECT: u32 = 0x9581;
/// `GL_DEVICE_UUID_EXT`.
const GL_DEVICE_UUID: u32 = 0x9597;
/// `GL_NUM_DEVICE_UUIDS_EXT`.
const GL_NUM_DEVICE_UUIDS: u32 = 0x9596;

/// The GL side of `GL_EXT_memory_object(_fd)`, which glow does not wrap.
struct GlMemoryFns {
    create: unsafe extern "system" fn(i32, *mut u32),
    delete: unsafe extern "system" fn(i32, *const u32),
    parameter: unsafe extern "system" fn(u32, u32, *const i32),
    import_fd: unsafe extern "system" fn(u32, u64, u32, i32),
    buffer_storage: unsafe extern "system" fn(u32, isize, u32, u64),
    device_uuid: unsafe extern "system" fn(u32, u32, *mut u8),
}

impl GlMemoryFns {
    #[allow(clippy::missing_transmute_annotations)]
    fn load(ctx: &GlContext) -> Result<Self> {
        let need = |name: &CStr| -> Result<*const c_void> {
            let f = ctx.proc_address(name);
            if f.is_null() {
                Err(unavailable(format!("the GL driver lacks {name:?}")))
            } else {
                Ok(f)
            }
        };
        for ext in ["GL_EXT_memory_object", "GL_EXT_memory_object_fd"] {
            if !glow::HasContext::supported_extensions(&*ctx.gl).contains(ext) {
                return Err(unavailable(format!("no {ext}")));
            }
        }
        // SAFETY: each address is the driver's entry point of the named function (present, as
        // its extension is), whose C signature the field's type spells out.
        unsafe {
            Ok(Self {
                create: std::mem::transmute::<*const c_void, _>(need(c"glCreateMemoryObjectsEXT")?),
                delete: std::mem::transmute::<*const c_void, _>(need(c"glDeleteMemoryObjectsEXT")?),
                parameter: std::mem::transmute::<*const c_void, _>(need(
                    c"glMemoryObjectParameterivEXT",
                )?),
                import_fd: std::mem::transmute::<*const c_void, _>(need(c"glImportMemoryFdEXT")?),
                buffer_storage: std::mem::transmute::<*const c_void, _>(need(
                    c"glBufferStorageMemEXT",
                )?),
                device_uuid: std::mem::transmute::<*const c_void, _>(need(
                    c"glGetUnsignedBytei_vEXT",
                )?),
            })
        }
    }
}

fn unavailable(why: impl Into<String>) -> Error {
    Error::DeviceUnavailable(format!("Vulkan memory shared with GL: {}", why.into()))
}

fn vk_err(what: &str) -> impl Fn(vk::Result) -> Error + '_ {
    move |e| Error::Gpu(format!("Vulkan: {what}: {e}"))
}

/// The Vulkan device and what every buffer needs to free itself. One per GPU, opened by the
/// first worker that needs it and kept for the life of the process ([`OPEN`]).
struct Device {
    /// The GPU's UUID.
    uuid: [u8; 16],
    _entry: ash::Entry,
    instance: ash::Instance,
    device: ash::Device,
    memory: vk::PhysicalDeviceMemoryProperties,
    fd: ash::khr::external_memory_fd::Device,
    /// Exportable buffers need memory of their own (`VK_..._DEDICATED_ONLY`).
    dedicated: bool,
    gl_fns: GlMemoryFns,
}

/// The Vulkan devices opened, kept until the process exits and shared by every worker on
/// their GPU. Never destroyed while the process runs: the NVIDIA driver's `vkDestroyDevice`
/// joins a thread of its own that can wait for a lock that another thread's GL call holds,
/// and so hung forever when a Juggler was dropped while others ran (seen on the H100, the
/// validation's `fault/fence_timeout` and `auto/choice` hangs; stacks in `docs/experiments.md`).
static OPEN: Mutex<Vec<Arc<Device>>> = Mutex::new(Vec::new());

impl Drop for Device {
    fn drop(&mut self) {
        // Only a device that failed to open is dropped (see OPEN).
        // SAFETY: every buffer holds an Arc of this device, so all are gone; waiting for
        // the device to be idle makes destroying it sound.
        unsafe {
            let _ = self.device.device_wait_idle();
            self.device.destroy_device(None);
            self.instance.destroy_instance(None);
        }
    }
}

/// Vulkan on the GL context's GPU, for memory shared with GL (see the module docs). Lives on
/// the thread of that context.
pub struct VkMemory {
    dev: Arc<Device>,
    gl: Rc<glow::Context>,
    /// The GPU's UUID (GL's and Vulkan's, which match).
    pub uuid: [u8; 16],
}

/// Device memory that GL and Vulkan both see: a GL storage buffer over a Vulkan buffer.
pub struct SharedBuffer {
    /// The GL buffer (there once made, until dropped, first).
    gl: Option<Buffer>,
    context: Rc<glow::Context>,
    memory_object: u32,
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    /// Bytes of `memory`.
    size: u64,
    dev: Arc<Device>,
}

/// A new file descriptor for `memory` of `dev`, allocated exportable (the importer owns it).
fn memory_fd(dev: &Device, memory: vk::DeviceMemory) -> Result<i32> {
    // SAFETY: exporting live memory allocated with an exportable handle type.
    unsafe {
        dev.fd.get_memory_fd(
            &vk::MemoryGetFdInfoKHR::default()
                .memory(memory)
                .handle_type(vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD),
        )
    }
    .map_err(vk_err("exporting memory"))
}

impl SharedBuffer {
    /// A new file descriptor for the memory (the importer owns it), its size in bytes, and
    /// whether it is a dedicated allocation: what another API (CUDA) needs to import it.
    pub fn export_fd(&self) -> Result<(i32, u64, bool)> {
        Ok((
            memory_fd(&self.dev, self.memory)?,
            self.size,
            self.dev.dedicated,
        ))
    }

    /// The GL storage buffer over it.
    pub fn gl(&self) -> &Buffer {
        self.gl
            .as_ref()
            .expect("a shared buffer has its GL buffer until dropped")
    }
}

impl Drop for SharedBuffer {
    fn drop(&mut self) {
        // GL work may still read or write the memory: finish it before Vulkan frees it.
        gl::finish(&self.context);
        drop(self.gl.take());
        // SAFETY: GL has finished all work and deleted its buffer, so the memory object and the
        // Vulkan memory are unused (copies: the caller has waited for every copy's fence).
        unsafe {
            (self.dev.gl_fns.delete)(1, &self.memory_object);
            self.dev.device.destroy_buffer(self.buffer, None);
            self.dev.device.free_memory(self.memory, None);
        }
    }
}

impl VkMemory {
    /// Opens Vulkan on the GPU of `ctx` (current on this thread); fails with
    /// [`Error::DeviceUnavailable`] where there is no loader, no such device, or no memory
    /// sharing with GL.
    pub fn new(ctx: &GlContext) -> Result<Self> {
        let gl_fns = GlMemoryFns::load(ctx)?;
        let gl_uuid = {
            let mut n = 0i32;
            // SAFETY: GL_NUM_DEVICE_UUIDS_EXT is one integer; the UUID query writes 16 bytes
            // (GL_UUID_SIZE_EXT) for an index below that count.
            unsafe {
                use glow::HasContext;
                n = ctx.gl.get_parameter_i32(GL_NUM_DEVICE_UUIDS).max(n);
                let mut uuid = [0u8; 16];
                if n > 0 {
                    (gl_fns.device_uuid)(GL_DEVICE_UUID, 0, uuid.as_mut_ptr());
                }
                uuid
            }
        };
        gl::check(&ctx.gl, "reading the GL device UUID")?;
        // One device per GPU for the process: opened under the lock, so only once.
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(dev) = open.iter().find(|d| d.uuid == gl_uuid) {
            return Ok(Self {
                dev: Arc::clone(dev),
                gl: Rc::clone(&ctx.gl),
                uuid: gl_uuid,
            });
        }
        // SAFETY: loading the system's Vulkan loader; its functions are called as documented.
        let entry = unsafe { ash::Entry::load() }
            .map_err(|e| unavailable(format!("no Vulkan loader: {e}")))?;
        let app = vk::ApplicationInfo::default()
            .application_name(c"sporkle")
            .api_version(vk::API_VERSION_1_1);
        // SAFETY: a valid create info; the instance is destroyed by Device's Drop (or below).
        let instance = unsafe {
            entry.create_instance(
                &vk::InstanceCreateInfo::default().application_info(&app),
                None,
            )
        }
        .map_err(|e| unavailable(format!("cannot create a Vulkan instance: {e}")))?;
        match Self::open(entry, instance, gl_uuid, gl_fns, &ctx.gl) {
            Ok(t) => {
                open.push(Arc::clone(&t.dev));
                Ok(t)
            }
            Err((e, instance)) => {
                if let Some(instance) = instance {
                    // SAFETY: nothing was created from the instance that still lives.
                    unsafe { instance.destroy_instance(None) };
                }
                Err(e)
            }
        }
    }

    /// The rest of [`VkMemory::new`]: on failure, the instance comes back to be destroyed.
    #[allow(clippy::result_large_err)]
    fn open(
        entry: ash::Entry,
        instance: ash::Instance,
        gl_uuid: [u8; 16],
        gl_fns: GlMemoryFns,
        gl: &Rc<glow::Context>,
    ) -> std::result::Result<Self, (Error, Option<ash::Instance>)> {
        let fail = |e: Error, i: ash::Instance| Err((e, Some(i)));
        // SAFETY: enumerating and querying physical devices of a live instance.
        let physical = unsafe { instance.enumerate_physical_devices() };
        let Ok(physical) = physical else {
            return fail(unavailable("cannot list Vulkan devices"), instance);
        };
        let found = physical.into_iter().find(|&pd| {
            let mut id = vk::PhysicalDeviceIDProperties::default();
            let mut props = vk::PhysicalDeviceProperties2::default().push_next(&mut id);
            // SAFETY: as above; `props` chains a valid ID-properties struct.
            unsafe { instance.get_physical_device_properties2(pd, &mut props) };
            id.device_uuid == gl_uuid
        });
        let Some(pd) = found else {
            return fail(
                unavailable("no Vulkan device has the GL device's UUID"),
                instance,
            );
        };
        // A device needs a queue: one of family 0 (nothing is ever submitted to it).
        let priorities = [1.0f32];
        let queue_info = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(0)
            .queue_priorities(&priorities)];
        let extensions = [ash::khr::external_memory_fd::NAME.as_ptr()];
        let info = vk::DeviceCreateInfo::default()
            .queue_create_infos(&queue_info)
            .enabled_extension_names(&extensions);
        // SAFETY: a valid create info for a device of this instance.
        let device = match unsafe { instance.create_device(pd, &info, None) } {
            Ok(d) => d,
            Err(e) => {
                return fail(
                    unavailable(format!("cannot open the Vulkan device: {e}")),
                    instance,
                )
            }
        };
        // Whether exportable buffers must have memory of their own.
        let mut external = vk::ExternalBufferProperties::default();
        // SAFETY: querying a physical device of a live instance with valid structs.
        unsafe {
            instance.get_physical_device_external_buffer_properties(
                pd,
                &vk::PhysicalDeviceExternalBufferInfo::default()
                    .usage(vk::BufferUsageFlags::TRANSFER_SRC | vk::BufferUsageFlags::TRANSFER_DST)
                    .handle_type(vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD),
                &mut external,
            )
        };
        let features = external.external_memory_properties.external_memory_features;
        // SAFETY: as above.
        let memory = unsafe { instance.get_physical_device_memory_properties(pd) };
        let fd = ash::khr::external_memory_fd::Device::new(&instance, &device);
        let dev = Arc::new(Device {
            uuid: gl_uuid,
            _entry: entry,
            instance,
            device,
            memory,
            fd,
            dedicated: features.contains(vk::ExternalMemoryFeatureFlags::DEDICATED_ONLY),
            gl_fns,
        });
        if !features.contains(vk::ExternalMemoryFeatureFlags::EXPORTABLE) {
            // Device's Drop destroys the device and the instance.
            return Err((
                unavailable("the Vulkan device cannot export buffer memory as a file descriptor"),
                None,
            ));
        }
        Ok(Self {
            dev,
            gl: Rc::clone(gl),
            uuid: gl_uuid,
        })
    }

    /// The index of a device-local memory type allowed by `bits`.
    fn device_local_type(&self, bits: u32) -> Result<u32> {
        let m = &self.dev.memory;
        (0..m.memory_type_count as usize)
            .find(|&i| {
                bits & (1 << i) != 0
                    && m.memory_types[i]
                        .property_flags
                        .contains(vk::MemoryPropertyFlags::DEVICE_LOCAL)
            })
            .map(|i| i as u32)
            .ok_or_else(|| Error::Gpu("Vulkan: no device-local memory type".into()))
    }

    /// A Vulkan buffer of `bytes` and its device-local memory, exportable as an fd, bound.
    fn allocate(&self, bytes: u64) -> Result<(vk::Buffer, vk::DeviceMemory, u64)> {
        let d = &self.dev.device;
        let handle = vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD;
        let mut external = vk::ExternalMemoryBufferCreateInfo::default().handle_types(handle);
        let info = vk::BufferCreateInfo::default()
            .size(bytes.max(16))
            .usage(vk::BufferUsageFlags::TRANSFER_SRC | vk::BufferUsageFlags::TRANSFER_DST)
            .sharing_mode(vk::SharingMode::EXCLUSIVE)
            .push_next(&mut external);
        // SAFETY: a valid create info on a live device; freed by the caller's Drop (or below).
        let buffer =
            unsafe { d.create_buffer(&info, None) }.map_err(vk_err("creating a buffer"))?;
        // SAFETY: querying a live buffer.
        let req = unsafe { d.get_buffer_memory_requirements(buffer) };
        let allocated = self
            .device_local_type(req.memory_type_bits)
            .and_then(|index| {
                let mut exported = vk::ExportMemoryAllocateInfo::default().handle_types(handle);
                let mut dedicated = vk::MemoryDedicatedAllocateInfo::default().buffer(buffer);
                let mut alloc = vk::MemoryAllocateInfo::default()
                    .allocation_size(req.size)
                    .memory_type_index(index)
                    .push_next(&mut exported);
                if self.dev.dedicated {
                    alloc = alloc.push_next(&mut dedicated);
                }
                // SAFETY: a valid allocate info; the memory is bound to the buffer just made.
                unsafe {
                    let memory = d
                        .allocate_memory(&alloc, None)
                        .map_err(vk_err("allocating memory"))?;
                    if let Err(e) = d.bind_buffer_memory(buffer, memory, 0) {
                        d.free_memory(memory, None);
                        return Err(vk_err("binding memory")(e));
                    }
                    Ok(memory)
                }
            });
        match allocated {
            Ok(memory) => Ok((buffer, memory, req.size)),
            Err(e) => {
                // SAFETY: the buffer is unused.
                unsafe { d.destroy_buffer(buffer, None) };
                Err(e)
            }
        }
    }

    /// Device memory for `len` floats that GL sees as a storage buffer.
    pub fn shared_buffer(&self, len: usize) -> Result<SharedBuffer> {
        let bytes = (len.max(4) * 4) as u64;
        let (buffer, memory, size) = self.allocate(bytes)?;
        let fns = &self.dev.gl_fns;
        let d = &self.dev.device;
        let fd = match memory_fd(&self.dev, memory) {
            Ok(fd) => fd,
            Err(e) => {
                // SAFETY: the buffer and memory are unused.
                unsafe {
                    d.destroy_buffer(buffer, None);
                    d.free_memory(memory, None);
                }
                return Err(e);
            }
        };
        let mut memory_object = 0u32;
        // SAFETY: GL_EXT_memory_object calls on the current context; importing an fd gives it to
        // GL (it closes it), and the memory object is deleted by SharedBuffer's Drop.
        unsafe {
            (fns.create)(1, &mut memory_object);
            if self.dev.dedicated {
                (fns.parameter)(memory_object, GL_DEDICATED_MEMORY_OBJECT, &1);
            }
            (fns.import_fd)(memory_object, size, GL_HANDLE_TYPE_OPAQUE_FD, fd);
        }
        // From here its Drop frees the memory object and the Vulkan buffer and memory, on
        // failure too.
        let mut shared = SharedBuffer {
            gl: None,
            context: Rc::clone(&self.gl),
            memory_object,
            buffer,
            memory,
            size,
            dev: Arc::clone(&self.dev),
        };
        gl::check(&self.gl, "importing Vulkan memory")?;
        let gl_buffer = Buffer::with_storage(&self.gl, len, |_, bytes| {
            // SAFETY: the buffer is bound to the storage target; the memory object holds `size`
            // bytes, at least `bytes`.
            unsafe {
                (fns.buffer_storage)(
                    glow::SHADER_STORAGE_BUFFER,
                    bytes as isize,
                    memory_object,
                    0,
                )
            };
        })?;
        shared.gl = Some(gl_buffer);
        Ok(shared)
    }
}
