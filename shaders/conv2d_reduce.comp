// conv2d_reduce.comp: the second pass of a split-K convolution (conv2d_tiled.comp with SPLIT > 1):
// adds the SPLIT partial outputs in slice order, then the bias, so the result does not depend on
// scheduling.
//
// `#define`s prepended from Rust (src/gpu/shaders.rs): SPLIT, OUT_LEN (= N * C_OUT * HOWO),
// C_OUT, HOWO (= HO * WO), HAS_BIAS (0/1), THREADS.

layout(local_size_x = THREADS) in;

layout(std430, binding = 0) readonly buffer Partial { float part[]; };
layout(std430, binding = 2) readonly buffer Bias { float bias[]; };
layout(std430, binding = 3) writeonly buffer Output { float y[]; };

void main() {
    const uint stride = gl_NumWorkGroups.x * THREADS;
    for (uint e = gl_GlobalInvocationID.x; e < OUT_LEN; e += stride) {
        float v = part[e];
        for (uint s = 1u; s < SPLIT; s++) {
            v += part[s * OUT_LEN + e];
        }
#if HAS_BIAS
        v += bias[(e / HOWO) % C_OUT];
#endif
        y[e] = v;
    }
}
