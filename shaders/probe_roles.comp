// probe_roles.comp: diagnostics (src/gpu/overlap.rs, `sporkle probe-zero-copy`): one dispatch
// whose workgroups take one of three roles by index: copy IN_GROUPS' share of the input from
// mapped host memory to a device buffer, copy the output from a device buffer to mapped host
// memory, or run a fixed FMA workload. Copies read each vec4 once, UNROLL loads in flight per
// invocation. `#define`s prepended from Rust: THREADS, IN_GROUPS, OUT_GROUPS, N4 (vec4s per
// copy), ITERS, UNROLL.

layout(local_size_x = THREADS) in;

layout(std430, binding = 0) readonly buffer HostIn { vec4 host_in[]; };
layout(std430, binding = 1) writeonly buffer DevIn { vec4 dev_in[]; };
layout(std430, binding = 2) readonly buffer DevOut { vec4 dev_out[]; };
layout(std430, binding = 3) writeonly buffer HostOut { vec4 host_out[]; };
layout(std430, binding = 4) writeonly buffer Sink { float sink[]; };

void main() {
    uint g = gl_WorkGroupID.x;
    uint lane = gl_LocalInvocationID.x;
    if (g < IN_GROUPS) {
        uint stride = IN_GROUPS * THREADS;
        for (uint i = g * THREADS + lane; i < N4; i += stride * UNROLL) {
            vec4 v[UNROLL];
            for (uint u = 0u; u < UNROLL; u++) {
                uint j = i + u * stride;
                if (j < N4) v[u] = host_in[j];
            }
            for (uint u = 0u; u < UNROLL; u++) {
                uint j = i + u * stride;
                if (j < N4) dev_in[j] = v[u];
            }
        }
    } else if (g < IN_GROUPS + OUT_GROUPS) {
        uint stride = OUT_GROUPS * THREADS;
        for (uint i = (g - IN_GROUPS) * THREADS + lane; i < N4; i += stride * UNROLL) {
            vec4 v[UNROLL];
            for (uint u = 0u; u < UNROLL; u++) {
                uint j = i + u * stride;
                if (j < N4) v[u] = dev_out[j];
            }
            for (uint u = 0u; u < UNROLL; u++) {
                uint j = i + u * stride;
                if (j < N4) host_out[j] = v[u];
            }
        }
    } else {
        float s = float(gl_GlobalInvocationID.x) * 1e-9;
        vec4 a0 = vec4(s), a1 = vec4(s + 1.0), a2 = vec4(s + 2.0), a3 = vec4(s + 3.0);
        const vec4 m = vec4(0.999999);
        const vec4 c = vec4(1e-7);
        for (uint i = 0u; i < ITERS; i++) {
            a0 = fma(a0, m, c);
            a1 = fma(a1, m, c);
            a2 = fma(a2, m, c);
            a3 = fma(a3, m, c);
        }
        vec4 t = a0 + a1 + a2 + a3;
        sink[gl_GlobalInvocationID.x] = t.x + t.y + t.z + t.w;
    }
}
