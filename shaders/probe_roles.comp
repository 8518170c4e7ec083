// probe_roles.comp: diagnostics (src/gpu/overlap.rs, `sporkle probe-zero-copy`): one dispatch
// whose first workgroups run the streaming copies (stream_copy.glsl, prepended from Rust, with
// its `copies` uniform) and whose others run a fixed FMA workload, to measure whether copies
// across the bus and compute overlap inside one dispatch. `#define`s: THREADS, ITERS.

layout(local_size_x = THREADS) in;

layout(std430, binding = 0) writeonly buffer Sink { float sink[]; };

void main() {
    const uint g = gl_WorkGroupID.x;
    if (g < copies.x + copies.y) {
        stream_copy(g);
        return;
    }
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
