// stream_copy.glsl: the streaming executor's copies across the bus (src/gpu/executor.rs). A
// function, not a shader: the executor either prepends it to a convolution, whose first
// workgroups then copy while the others convolve (one dispatch, so the copies and the
// convolution run on the GPU together), or runs it alone (stream_copy.comp).
//
// Copy-in moves a job's input from its mapped upload staging (host memory) into its device input
// buffer; copy-out moves another job's output from its device buffer into its mapped download
// staging. Each vec4 is read once; every invocation keeps four loads in flight, since reads of
// host memory take a microsecond or more.
// Needs THREADS (invocations per workgroup). Uniform `copies`: (workgroups copying in,
// workgroups copying out, vec4s to copy in, vec4s to copy out); buffers are padded to whole vec4s.

layout(std430, binding = 4) readonly buffer CopyInFrom { vec4 copy_in_from[]; };
layout(std430, binding = 5) writeonly buffer CopyInTo { vec4 copy_in_to[]; };
layout(std430, binding = 6) readonly buffer CopyOutFrom { vec4 copy_out_from[]; };
layout(std430, binding = 7) writeonly buffer CopyOutTo { vec4 copy_out_to[]; };

uniform uvec4 copies;

// Workgroup `group` of `groups` copies its share of `len` vec4s, grid-stride.
#define COPY_LOOP(from, to, group, groups, len) { \
    const uint stride = (groups) * THREADS; \
    for (uint i = (group) * THREADS + gl_LocalInvocationIndex; i < (len); i += 4u * stride) { \
        const uint i1 = i + stride, i2 = i + 2u * stride, i3 = i + 3u * stride; \
        vec4 v0 = from[i], v1 = vec4(0.0), v2 = vec4(0.0), v3 = vec4(0.0); \
        if (i1 < (len)) v1 = from[i1]; \
        if (i2 < (len)) v2 = from[i2]; \
        if (i3 < (len)) v3 = from[i3]; \
        to[i] = v0; \
        if (i1 < (len)) to[i1] = v1; \
        if (i2 < (len)) to[i2] = v2; \
        if (i3 < (len)) to[i3] = v3; \
    } \
}

// The copying workgroup `group` (0-based): the first copies.x copy in, the next copies.y copy
// out, any others have nothing to do.
void stream_copy(uint group) {
    if (group < copies.x) {
        COPY_LOOP(copy_in_from, copy_in_to, group, copies.x, copies.z)
    } else if (group < copies.x + copies.y) {
        COPY_LOOP(copy_out_from, copy_out_to, group - copies.x, copies.y, copies.w)
    }
}
