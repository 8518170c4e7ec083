// calibrate.comp: a fixed FP32 workload that shares no code with sporkle's convolution kernels,
// for performance baselines on the GPU (src/validate/perf.rs): each invocation runs eight
// independent vec4 multiply-add chains for ITERS iterations, so the GPU's FMA units and clocks set
// its speed, and writes one value so that nothing is optimised away.
// `#define`s prepended from Rust (src/gpu/shaders.rs): THREADS, ITERS.

layout(local_size_x = THREADS) in;

layout(std430, binding = 3) writeonly buffer Output { float y[]; };

void main() {
    float s = float(gl_GlobalInvocationID.x) * 1e-9;
    vec4 a0 = vec4(s), a1 = vec4(s + 1.0), a2 = vec4(s + 2.0), a3 = vec4(s + 3.0);
    vec4 a4 = vec4(s + 4.0), a5 = vec4(s + 5.0), a6 = vec4(s + 6.0), a7 = vec4(s + 7.0);
    const vec4 m = vec4(0.999999);
    const vec4 c = vec4(1e-7);
    for (uint i = 0u; i < ITERS; i++) {
        a0 = fma(a0, m, c);
        a1 = fma(a1, m, c);
        a2 = fma(a2, m, c);
        a3 = fma(a3, m, c);
        a4 = fma(a4, m, c);
        a5 = fma(a5, m, c);
        a6 = fma(a6, m, c);
        a7 = fma(a7, m, c);
    }
    vec4 t = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
    y[gl_GlobalInvocationID.x] = t.x + t.y + t.z + t.w;
}
