// winograd_input.comp: first pass of the Winograd F(2x2, 3x3) convolution (3x3 taps, stride 1,
// dilation 1, one group): the input transform V = B^T d B of every 4x4 input patch d.
//
// `#define`s prepended from Rust (src/gpu/winograd.rs): N C_IN H W PH PW (unsigned), TH TW
// (tiles per column and per row: ceil(HO / 2), ceil(WO / 2)), THREADS.
// Tile t of image n covers outputs (2 ty .. 2 ty + 1, 2 tx .. 2 tx + 1) and reads the input
// patch whose corner is (2 ty - PH, 2 tx - PW); positions outside the image read as zero.
// Output: v[xi][c][p] with p = (n * TH + ty) * TW + tx and xi = 4 * row + column of the
// transformed patch: 16 matrices of C_IN x P, the B operand of conv2d_tiled.comp's GEMM.

#define P (N * TH * TW)

layout(local_size_x = THREADS) in;

layout(std430, binding = 0) readonly buffer Input { float x[]; };
layout(std430, binding = 3) writeonly buffer Transformed { float v[]; };

// Row r of the patch of channel plane `plane` with corner (y0, x0), zero outside the image.
vec4 patch_row(uint plane, int y0, int x0, int r) {
    int iy = y0 + r;
    vec4 d = vec4(0.0);
    if (uint(iy) < H) {
        uint row = plane + uint(iy) * W;
        // Unsigned comparison: a negative column is out of bounds too.
        d.x = uint(x0) < W ? x[row + uint(x0)] : 0.0;
        d.y = uint(x0 + 1) < W ? x[row + uint(x0 + 1)] : 0.0;
        d.z = uint(x0 + 2) < W ? x[row + uint(x0 + 2)] : 0.0;
        d.w = uint(x0 + 3) < W ? x[row + uint(x0 + 3)] : 0.0;
    }
    return d;
}

// t B for a row t of B^T d: B^T applied along the row.
vec4 bt(vec4 t) {
    return vec4(t.x - t.z, t.y + t.z, t.z - t.y, t.y - t.w);
}

void main() {
    const uint stride = gl_NumWorkGroups.x * THREADS;
    for (uint e = gl_GlobalInvocationID.x; e < C_IN * P; e += stride) {
        // Neighbouring threads take neighbouring tiles: the writes below are coalesced.
        const uint c = e / P;
        const uint p = e % P;
        const uint n = p / (TH * TW);
        const uint t = p % (TH * TW);
        const int y0 = int(t / TW) * 2 - int(PH);
        const int x0 = int(t % TW) * 2 - int(PW);
        const uint plane = (n * C_IN + c) * H * W;
        const vec4 d0 = patch_row(plane, y0, x0, 0);
        const vec4 d1 = patch_row(plane, y0, x0, 1);
        const vec4 d2 = patch_row(plane, y0, x0, 2);
        const vec4 d3 = patch_row(plane, y0, x0, 3);
        // B^T d (along the columns), then B along the rows.
        const vec4 r0 = bt(d0 - d2);
        const vec4 r1 = bt(d1 + d2);
        const vec4 r2 = bt(d2 - d1);
        const vec4 r3 = bt(d1 - d3);
        const uint cp = C_IN * P;
        const uint at = c * P + p;
        v[at] = r0.x;
        v[at + cp] = r0.y;
        v[at + 2u * cp] = r0.z;
        v[at + 3u * cp] = r0.w;
        v[at + 4u * cp] = r1.x;
        v[at + 5u * cp] = r1.y;
        v[at + 6u * cp] = r1.z;
        v[at + 7u * cp] = r1.w;
        v[at + 8u * cp] = r2.x;
        v[at + 9u * cp] = r2.y;
        v[at + 10u * cp] = r2.z;
        v[at + 11u * cp] = r2.w;
        v[at + 12u * cp] = r3.x;
        v[at + 13u * cp] = r3.y;
        v[at + 14u * cp] = r3.z;
        v[at + 15u * cp] = r3.w;
    }
}
