// winograd_output.comp: last pass of the Winograd F(2x2, 3x3) convolution: the output transform
// Y = A^T M A of every tile's 4x4 products (summed over the channels by the GEMM pass), the bias,
// and the 2x2 outputs of the tile written to NCHW (the parts inside HO x WO).
//
// `#define`s prepended from Rust (src/gpu/winograd.rs): N C_OUT HO WO TH TW (unsigned),
// HAS_BIAS (0/1), THREADS. Input: m[xi][k][p], p = (n * TH + ty) * TW + tx (see
// winograd_input.comp).

#define P (N * TH * TW)

layout(local_size_x = THREADS) in;

layout(std430, binding = 0) readonly buffer Products { float m[]; };
layout(std430, binding = 2) readonly buffer Bias { float bias[]; };
layout(std430, binding = 3) writeonly buffer Output { float y[]; };

// Row r (xi = 4r .. 4r + 3) of tile p of filter k.
vec4 products_row(uint at, uint r) {
    const uint kp = C_OUT * P;
    return vec4(m[at + 4u * r * kp], m[at + (4u * r + 1u) * kp], m[at + (4u * r + 2u) * kp],
                m[at + (4u * r + 3u) * kp]);
}

void main() {
    const uint stride = gl_NumWorkGroups.x * THREADS;
    for (uint e = gl_GlobalInvocationID.x; e < C_OUT * P; e += stride) {
        // Neighbouring threads take neighbouring tiles: the reads are coalesced.
        const uint k = e / P;
        const uint p = e % P;
        const uint n = p / (TH * TW);
        const uint t = p % (TH * TW);
        const uint oy = t / TW * 2u;
        const uint ox = t % TW * 2u;
        const vec4 m0 = products_row(e, 0u);
        const vec4 m1 = products_row(e, 1u);
        const vec4 m2 = products_row(e, 2u);
        const vec4 m3 = products_row(e, 3u);
        // A^T M (along the columns), then A along the rows.
        const vec4 s0 = m0 + m1 + m2;
        const vec4 s1 = m1 - m2 - m3;
        float b = 0.0;
#if HAS_BIAS
        b = bias[k];
#endif
        const uint at = ((n * C_OUT + k) * HO + oy) * WO + ox;
        y[at] = s0.x + s0.y + s0.z + b;
        if (ox + 1u < WO) {
            y[at + 1u] = s0.y - s0.z - s0.w + b;
        }
        if (oy + 1u < HO) {
            y[at + WO] = s1.x + s1.y + s1.z + b;
            if (ox + 1u < WO) {
                y[at + WO + 1u] = s1.y - s1.z - s1.w + b;
            }
        }
    }
}
