//! Transfers through Vulkan beside GL compute: the copy engines that GL does not expose.
//!
//! One GL context runs its copies and dispatches one after another, and shader copies across
//! the bus reach 77 GB/s both ways together on the H100 where its copy engines reach 87 (see
//! the README). Vulkan exposes those engines as transfer queues. This module opens a Vulkan
//! device on the same GPU as the GL context (matched by device UUID), allocates device memory
//! that both APIs see (exported by Vulkan as an opaque file descriptor, imported into GL with
//! `GL_EXT_memory_object_fd`, bound to a GL storage buffer) and host memory Vulkan copies from
//! and to, and records copies on up to two transfer queues ("lanes"), each finished by a fence.
//!
//! Ordering between the APIs is the caller's: a copy into a shared buffer may start only once
//! GL has finished with it (a GL fence has passed), and GL may read it only once the copy's
//! fence has passed. The Vulkan loader is opened at run time (`ash`'s `loaded` feature), so
//! machines without one simply have no Vulkan transfers.
//!
//! With `context.rs` and `gl.rs`, this file holds the GPU's `unsafe`: Vulkan and the GL
//! extension functions are C APIs; every block says why it is sound.

use super::context::GlContext;
use super::gl::{self, Buffer};
use crate::error::{Error, Result};
use ash::vk;
use std::ffi::{c_void, CStr};
use std::rc::Rc;
use std::time::Duration;

/// `GL_HANDLE_TYPE_OPAQUE_FD_EXT`.
const GL_HANDLE_TYPE_OPAQUE_FD: u32 = 0x9586;
/// `GL_DEDICATED_MEMORY_OBJECT_EXT`.
const GL_DEDICATED_MEMORY_OBJECT: u32 = 0x9581;
/// `GL_DEVICE_UUID_EXT`.
const GL_DEVICE_UUID: u32 = 0x9597;
/// `GL_NUM_DEVICE_UUIDS_EXT`.
const GL_NUM_DEVICE_UUIDS: u32 = 0x9596;

/// Copies each lane may have in flight.
const RING: usize = 8;

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
    Error::DeviceUnavailable(format!("Vulkan transfers: {}", why.into()))
}

fn vk_err(what: &str) -> impl Fn(vk::Result) -> Error + '_ {
    move |e| Error::Gpu(format!("Vulkan: {what}: {e}"))
}

/// A transfer queue and its ring of command buffers and fences.
struct Lane {
    queue: vk::Queue,
    family: u32,
    pool: vk::CommandPool,
    cmds: Vec<vk::CommandBuffer>,
    fences: Vec<vk::Fence>,
    /// Copies submitted on this lane so far (the next uses slot `next % RING`).
    next: u64,
}

/// The Vulkan device and what every buffer needs to free itself.
struct Device {
    _entry: ash::Entry,
    instance: ash::Instance,
    device: ash::Device,
    memory: vk::PhysicalDeviceMemoryProperties,
    fd: ash::khr::external_memory_fd::Device,
    /// Exportable buffers need memory of their own (`VK_..._DEDICATED_ONLY`).
    dedicated: bool,
    gl_fns: GlMemoryFns,
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: every buffer and lane holds an Rc of this device, so all are gone; waiting for
        // the device to be idle makes destroying it sound.
        unsafe {
            let _ = self.device.device_wait_idle();
            self.device.destroy_device(None);
            self.instance.destroy_instance(None);
        }
    }
}

/// Vulkan transfers on the GL context's GPU (see the module docs). Lives on the thread of
/// that context.
pub struct VkTransfer {
    dev: Rc<Device>,
    gl: Rc<glow::Context>,
    lanes: Vec<Lane>,
    /// The Vulkan device's name.
    pub name: String,
    /// The GPU's UUID (GL's and Vulkan's, which match).
    pub uuid: [u8; 16],
}

/// A copy submitted on a lane: wait for it with [`VkTransfer::wait`].
#[derive(Clone, Copy, Debug)]
pub struct Copy {
    lane: usize,
    serial: u64,
}

/// Device memory that GL and Vulkan both see: a GL storage buffer over a Vulkan buffer.
pub struct SharedBuffer {
    /// The GL buffer (always there until dropped, first).
    gl: Option<Buffer>,
    context: Rc<glow::Context>,
    memory_object: u32,
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    /// Bytes of `memory`.
    size: u64,
    dev: Rc<Device>,
}

impl SharedBuffer {
    /// A new file descriptor for the memory (the importer owns it), its size in bytes, and
    /// whether it is a dedicated allocation: what another API (CUDA) needs to import it.
    pub fn export_fd(&self) -> Result<(i32, u64, bool)> {
        // SAFETY: exporting live memory allocated with an exportable handle type.
        let fd = unsafe {
            self.dev.fd.get_memory_fd(
                &vk::MemoryGetFdInfoKHR::default()
                    .memory(self.memory)
                    .handle_type(vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD),
            )
        }
        .map_err(vk_err("exporting memory"))?;
        Ok((fd, self.size, self.dev.dedicated))
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

/// Host memory Vulkan copies from or to, mapped for as long as it lives.
pub struct HostBuffer {
    ptr: *mut f32,
    len: usize,
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    dev: Rc<Device>,
}

impl HostBuffer {
    /// The mapped floats. The caller makes sure (with the copy's fence) that no copy uses them.
    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: the mapping holds `len` floats and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// See [`HostBuffer::as_slice`].
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in as_slice; `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: the caller has waited for every copy that used it; freeing unmaps it.
        unsafe {
            self.dev.device.destroy_buffer(self.buffer, None);
            self.dev.device.free_memory(self.memory, None);
        }
    }
}

impl Drop for VkTransfer {
    fn drop(&mut self) {
        // SAFETY: waiting for the device to be idle first makes freeing the lanes sound.
        unsafe {
            let _ = self.dev.device.device_wait_idle();
            for lane in &self.lanes {
                for &f in &lane.fences {
                    self.dev.device.destroy_fence(f, None);
                }
                self.dev.device.destroy_command_pool(lane.pool, None);
            }
        }
    }
}

impl VkTransfer {
    /// Opens Vulkan on the GPU of `ctx` (current on this thread), with up to two transfer
    /// queues; fails with [`Error::DeviceUnavailable`] where there is no loader, no such
    /// device, or no memory sharing with GL.
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
            Ok(t) => Ok(t),
            Err((e, instance)) => {
                if let Some(instance) = instance {
                    // SAFETY: nothing was created from the instance that still lives.
                    unsafe { instance.destroy_instance(None) };
                }
                Err(e)
            }
        }
    }

    /// The rest of [`VkTransfer::new`]: on failure, the instance comes back to be destroyed.
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
        let found = physical.into_iter().find_map(|pd| {
            let mut id = vk::PhysicalDeviceIDProperties::default();
            let mut props = vk::PhysicalDeviceProperties2::default().push_next(&mut id);
            // SAFETY: as above; `props` chains a valid ID-properties struct.
            unsafe { instance.get_physical_device_properties2(pd, &mut props) };
            let name = props
                .properties
                .device_name_as_c_str()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (id.device_uuid == gl_uuid).then_some((pd, name))
        });
        let Some((pd, name)) = found else {
            return fail(
                unavailable("no Vulkan device has the GL device's UUID"),
                instance,
            );
        };
        // SAFETY: querying a physical device of a live instance.
        let families = unsafe { instance.get_physical_device_queue_family_properties(pd) };
        // A transfer-only family (the copy engines) if there is one, else any that transfers.
        let pick = |only: bool| {
            families.iter().position(|f| {
                f.queue_flags.contains(vk::QueueFlags::TRANSFER)
                    && (!only
                        || !f
                            .queue_flags
                            .intersects(vk::QueueFlags::GRAPHICS | vk::QueueFlags::COMPUTE))
            })
        };
        let Some(family) = pick(true).or_else(|| pick(false)) else {
            return fail(unavailable("no Vulkan queue transfers"), instance);
        };
        // Lanes: (family, queue). Two queues of the transfer family, or (diagnostics,
        // SPORKLE_VK_LANES=split) the second on an async compute family.
        let compute_only = families.iter().position(|f| {
            f.queue_flags.contains(vk::QueueFlags::COMPUTE)
                && !f.queue_flags.contains(vk::QueueFlags::GRAPHICS)
        });
        let split = std::env::var("SPORKLE_VK_LANES").is_ok_and(|v| v == "split");
        let lane_queues: Vec<(u32, u32)> = match compute_only {
            Some(c) if split && c != family => vec![(family as u32, 0), (c as u32, 0)],
            _ if families[family].queue_count >= 2 => vec![(family as u32, 0), (family as u32, 1)],
            _ => vec![(family as u32, 0)],
        };
        let priorities = [1.0f32; 2];
        let mut queue_info: Vec<vk::DeviceQueueCreateInfo> = Vec::new();
        for &(f, _) in &lane_queues {
            let count = lane_queues.iter().filter(|l| l.0 == f).count();
            if !queue_info.iter().any(|q| q.queue_family_index == f) {
                queue_info.push(
                    vk::DeviceQueueCreateInfo::default()
                        .queue_family_index(f)
                        .queue_priorities(&priorities[..count]),
                );
            }
        }
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
        let dev = Rc::new(Device {
            _entry: entry,
            instance,
            device,
            memory,
            fd,
            dedicated: std::env::var("SPORKLE_VK_DEDICATED").is_ok()
                || features.contains(vk::ExternalMemoryFeatureFlags::DEDICATED_ONLY),
            gl_fns,
        });
        if !features.contains(vk::ExternalMemoryFeatureFlags::EXPORTABLE) {
            // Device's Drop destroys the device and the instance.
            return Err((
                unavailable("the Vulkan device cannot export buffer memory as a file descriptor"),
                None,
            ));
        }
        let mut lanes = Vec::new();
        for &(f, q) in &lane_queues {
            match Self::lane(&dev.device, f, q) {
                Ok(l) => lanes.push(l),
                Err(e) => return Err((e, None)),
            }
        }
        Ok(Self {
            dev,
            gl: Rc::clone(gl),
            lanes,
            name,
            uuid: gl_uuid,
        })
    }

    /// Queue `index` of `family`, with its command buffers and fences.
    fn lane(device: &ash::Device, family: u32, index: u32) -> Result<Lane> {
        // SAFETY: creating objects on a live device with valid create infos; Drop frees them.
        unsafe {
            let queue = device.get_device_queue(family, index);
            let pool = device
                .create_command_pool(
                    &vk::CommandPoolCreateInfo::default()
                        .queue_family_index(family)
                        .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER),
                    None,
                )
                .map_err(vk_err("creating a command pool"))?;
            let cmds = device
                .allocate_command_buffers(
                    &vk::CommandBufferAllocateInfo::default()
                        .command_pool(pool)
                        .level(vk::CommandBufferLevel::PRIMARY)
                        .command_buffer_count(RING as u32),
                )
                .map_err(vk_err("allocating command buffers"))?;
            let mut fences = Vec::new();
            for _ in 0..RING {
                fences.push(
                    device
                        .create_fence(
                            &vk::FenceCreateInfo::default().flags(vk::FenceCreateFlags::SIGNALED),
                            None,
                        )
                        .map_err(vk_err("creating a fence"))?,
                );
            }
            Ok(Lane {
                queue,
                family,
                pool,
                cmds,
                fences,
                next: 0,
            })
        }
    }

    /// Transfer queues (1 or 2): with 2, copies in and out run on separate queues.
    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// The index of a memory type allowed by `bits` with all of `need`, preferring `want` too.
    fn memory_type(
        &self,
        bits: u32,
        need: vk::MemoryPropertyFlags,
        want: vk::MemoryPropertyFlags,
    ) -> Result<u32> {
        let m = &self.dev.memory;
        let types = &m.memory_types[..m.memory_type_count as usize];
        let ok = |i: usize, flags: vk::MemoryPropertyFlags| {
            bits & (1 << i) != 0
                && types[i].property_flags.contains(flags)
                && (!want.is_empty()
                    || !flags.contains(vk::MemoryPropertyFlags::HOST_VISIBLE)
                    || !types[i]
                        .property_flags
                        .contains(vk::MemoryPropertyFlags::HOST_CACHED)
                    || i == usize::MAX)
        };
        (0..types.len())
            .find(|&i| ok(i, need | want))
            .or_else(|| (0..types.len()).find(|&i| ok(i, need)))
            .map(|i| i as u32)
            .ok_or_else(|| Error::Gpu(format!("Vulkan: no memory type with {need:?}")))
    }

    /// A Vulkan buffer of `bytes` and its memory (exported where `export`), bound.
    fn allocate(
        &self,
        bytes: u64,
        export: bool,
        need: vk::MemoryPropertyFlags,
        want: vk::MemoryPropertyFlags,
    ) -> Result<(vk::Buffer, vk::DeviceMemory, u64)> {
        let d = &self.dev.device;
        let handle = vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD;
        let mut external = vk::ExternalMemoryBufferCreateInfo::default().handle_types(handle);
        let mut info = vk::BufferCreateInfo::default()
            .size(bytes.max(16))
            .usage(vk::BufferUsageFlags::TRANSFER_SRC | vk::BufferUsageFlags::TRANSFER_DST)
            .sharing_mode(vk::SharingMode::EXCLUSIVE);
        if export {
            info = info.push_next(&mut external);
        }
        // SAFETY: a valid create info on a live device; freed by the caller's Drop (or below).
        let buffer =
            unsafe { d.create_buffer(&info, None) }.map_err(vk_err("creating a buffer"))?;
        // SAFETY: querying a live buffer.
        let req = unsafe { d.get_buffer_memory_requirements(buffer) };
        let allocated = self
            .memory_type(req.memory_type_bits, need, want)
            .and_then(|index| {
                let mut exported = vk::ExportMemoryAllocateInfo::default().handle_types(handle);
                let mut dedicated = vk::MemoryDedicatedAllocateInfo::default().buffer(buffer);
                let mut alloc = vk::MemoryAllocateInfo::default()
                    .allocation_size(req.size)
                    .memory_type_index(index);
                if export {
                    alloc = alloc.push_next(&mut exported);
                    if self.dev.dedicated {
                        alloc = alloc.push_next(&mut dedicated);
                    }
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
        let (buffer, memory, size) = self.allocate(
            bytes,
            true,
            vk::MemoryPropertyFlags::DEVICE_LOCAL,
            vk::MemoryPropertyFlags::empty(),
        )?;
        let fns = &self.dev.gl_fns;
        let d = &self.dev.device;
        // SAFETY: exporting the memory just allocated with an exportable handle type.
        let fd = unsafe {
            self.dev.fd.get_memory_fd(
                &vk::MemoryGetFdInfoKHR::default()
                    .memory(memory)
                    .handle_type(vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD),
            )
        };
        let fd = match fd {
            Ok(fd) => fd,
            Err(e) => {
                // SAFETY: the buffer and memory are unused.
                unsafe {
                    d.destroy_buffer(buffer, None);
                    d.free_memory(memory, None);
                }
                return Err(vk_err("exporting memory")(e));
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
        let shared = |gl: Buffer| SharedBuffer {
            gl: Some(gl),
            context: Rc::clone(&self.gl),
            memory_object,
            buffer,
            memory,
            size,
            dev: Rc::clone(&self.dev),
        };
        if let Err(e) = gl::check(&self.gl, "importing Vulkan memory") {
            // SAFETY: as in SharedBuffer's Drop, with no GL buffer yet.
            unsafe {
                (fns.delete)(1, &memory_object);
                d.destroy_buffer(buffer, None);
                d.free_memory(memory, None);
            }
            return Err(e);
        }
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
        });
        match gl_buffer {
            Ok(b) => Ok(shared(b)),
            Err(e) => {
                // SAFETY: as in SharedBuffer's Drop (the failed GL buffer is already deleted).
                unsafe {
                    (fns.delete)(1, &memory_object);
                    d.destroy_buffer(buffer, None);
                    d.free_memory(memory, None);
                }
                Err(e)
            }
        }
    }

    /// Mapped host memory for `len` floats; `read`: the host reads it (cached memory if any).
    pub fn host_buffer(&self, len: usize, read: bool) -> Result<HostBuffer> {
        let bytes = (len.max(4) * 4) as u64;
        let mode = std::env::var("SPORKLE_VK_HOST").unwrap_or_default();
        let cached = match mode.as_str() {
            "cached" => true,
            "uncached" => false,
            _ => read,
        };
        let want = if cached {
            vk::MemoryPropertyFlags::HOST_CACHED
        } else {
            vk::MemoryPropertyFlags::empty()
        };
        let (buffer, memory, _) = self.allocate(
            bytes,
            false,
            vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT,
            want,
        )?;
        let d = &self.dev.device;
        // SAFETY: mapping host-visible memory once; it stays mapped until freed.
        let mapped =
            unsafe { d.map_memory(memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty()) };
        match mapped {
            Ok(ptr) => Ok(HostBuffer {
                ptr: ptr.cast(),
                len,
                buffer,
                memory,
                dev: Rc::clone(&self.dev),
            }),
            Err(e) => {
                // SAFETY: the buffer and memory are unused.
                unsafe {
                    d.destroy_buffer(buffer, None);
                    d.free_memory(memory, None);
                }
                Err(vk_err("mapping memory")(e))
            }
        }
    }

    /// Submits a copy of `floats` floats on `lane` (taken modulo the lanes there are); `shared`
    /// is the side (source or destination) that GL uses too, which the copy acquires from GL
    /// and releases back to it (queue family ownership transfers with `VK_QUEUE_FAMILY_EXTERNAL`).
    fn submit(
        &mut self,
        lane: usize,
        src: vk::Buffer,
        dst: vk::Buffer,
        floats: usize,
        shared: vk::Buffer,
    ) -> Result<Copy> {
        let lane = lane % self.lanes.len();
        let d = &self.dev.device;
        let l = &mut self.lanes[lane];
        let slot = (l.next % RING as u64) as usize;
        let (cmd, fence) = (l.cmds[slot], l.fences[slot]);
        // SAFETY: the slot's previous copy is waited for before its command buffer and fence
        // are reused; the buffers are live (the caller keeps them until the copy's fence).
        unsafe {
            d.wait_for_fences(&[fence], true, u64::MAX)
                .map_err(vk_err("waiting for an earlier copy"))?;
            d.reset_fences(&[fence])
                .map_err(vk_err("resetting a fence"))?;
            d.begin_command_buffer(
                cmd,
                &vk::CommandBufferBeginInfo::default()
                    .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT),
            )
            .map_err(vk_err("recording a copy"))?;
            let ownership = |from: u32, to: u32, src_access, dst_access| {
                [vk::BufferMemoryBarrier::default()
                    .src_access_mask(src_access)
                    .dst_access_mask(dst_access)
                    .src_queue_family_index(from)
                    .dst_queue_family_index(to)
                    .buffer(shared)
                    .offset(0)
                    .size(vk::WHOLE_SIZE)]
            };
            let transfer = vk::AccessFlags::TRANSFER_READ | vk::AccessFlags::TRANSFER_WRITE;
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::TOP_OF_PIPE,
                vk::PipelineStageFlags::TRANSFER,
                vk::DependencyFlags::empty(),
                &[],
                &ownership(
                    vk::QUEUE_FAMILY_EXTERNAL,
                    l.family,
                    vk::AccessFlags::empty(),
                    transfer,
                ),
                &[],
            );
            d.cmd_copy_buffer(
                cmd,
                src,
                dst,
                &[vk::BufferCopy {
                    src_offset: 0,
                    dst_offset: 0,
                    size: (floats * 4) as u64,
                }],
            );
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::TRANSFER,
                vk::PipelineStageFlags::BOTTOM_OF_PIPE,
                vk::DependencyFlags::empty(),
                &[],
                &ownership(
                    l.family,
                    vk::QUEUE_FAMILY_EXTERNAL,
                    transfer,
                    vk::AccessFlags::empty(),
                ),
                &[],
            );
            d.end_command_buffer(cmd)
                .map_err(vk_err("recording a copy"))?;
            let cmds = [cmd];
            d.queue_submit(
                l.queue,
                &[vk::SubmitInfo::default().command_buffers(&cmds)],
                fence,
            )
            .map_err(vk_err("submitting a copy"))?;
        }
        l.next += 1;
        Ok(Copy {
            lane,
            serial: l.next - 1,
        })
    }

    /// Copies `floats` floats from host memory into a shared buffer, on `lane`.
    pub fn upload(
        &mut self,
        lane: usize,
        src: &HostBuffer,
        dst: &SharedBuffer,
        floats: usize,
    ) -> Result<Copy> {
        self.submit(
            lane,
            src.buffer,
            dst.buffer,
            floats.min(src.len),
            dst.buffer,
        )
    }

    /// Copies `floats` floats from a shared buffer into host memory, on `lane`.
    pub fn download(
        &mut self,
        lane: usize,
        src: &SharedBuffer,
        dst: &HostBuffer,
        floats: usize,
    ) -> Result<Copy> {
        self.submit(
            lane,
            src.buffer,
            dst.buffer,
            floats.min(dst.len),
            src.buffer,
        )
    }

    /// Waits (at most `timeout`) for `copy`; whether it has finished. A copy older than the
    /// lane's ring has finished.
    pub fn wait(&self, copy: Copy, timeout: Duration) -> Result<bool> {
        let l = &self.lanes[copy.lane];
        if copy.serial + (RING as u64) < l.next {
            return Ok(true);
        }
        let fence = l.fences[(copy.serial % RING as u64) as usize];
        // SAFETY: waiting for a live fence.
        match unsafe {
            self.dev.device.wait_for_fences(
                &[fence],
                true,
                timeout.as_nanos().min(u64::MAX as u128) as u64,
            )
        } {
            Ok(()) => Ok(true),
            Err(vk::Result::TIMEOUT) => Ok(false),
            Err(e) => Err(vk_err("waiting for a copy")(e)),
        }
    }
}
