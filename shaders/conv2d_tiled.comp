// conv2d_tiled.comp: the fast implicit-GEMM 2-D convolution for groups of 16 or more filters,
// fp32, NCHW input, NKHW output; weights resident transposed as [group][tap][filter].
//
// `#version` and the `#define`s are prepended from Rust (src/gpu/shaders.rs):
//   tile:  BM filters x BN output positions per workgroup, BK taps per step, TM x TN outputs per
//          thread (multiples of 4), THREADS = (BM/TM)*(BN/TN); SPLIT slices of the taps
//          (split-K: with SPLIT > 1 each slice writes its partial sums, without bias, to its own
//          copy of the output, and conv2d_reduce.comp adds them in slice order)
//   shape: N C_IN H W C_OUT K_H K_W SH SW PH PW DH DW GROUPS HO WO (unsigned), HAS_BIAS (0/1),
//          A_FULL (1: the filters of a group are a whole number of BM tiles)
//   code:  DECL_ACC, LOAD_GLOBAL(k0), STORE_SHARED(buf), STEP(buf), STORE_ACC: the per-thread
//          register code, written out by Rust. NVIDIA's GLSL compiler keeps loops over small
//          arrays as loops and puts the arrays in local memory (seen in its program binary), so
//          the accumulators are named vec4 variables and nothing in the inner loop is an array.
// Per group g and slice s (workgroup z = g * SPLIT + s; x: filter tiles, y: position tiles):
// C[m][q] = sum_k A[k][m] B[k][q], m a filter, q = (image, y, x) an output position, k = (c, r, s)
// a tap. B is gathered from the input (no im2col buffer). Shared memory holds vec4 "quads": quad v
// of a row of A holds filters m0 + v + i * BM/4 (i = 0..3), quad v of B positions q0 + v + i * BN/4,
// so that neighbouring threads load neighbouring filters and positions (coalesced) and store
// neighbouring outputs. It is double-buffered: the next step's quads are loaded from global memory
// into registers while this step computes, and one barrier per step suffices.

#define CG (C_IN / GROUPS)
#define MG (C_OUT / GROUPS)
#define KHW (K_H * K_W)
#define KDIM (CG * KHW)
#define HOWO (HO * WO)
#define NPOS (N * HOWO)
// Taps per slice, a multiple of BK.
#define KSLICE ((KDIM + SPLIT * BK - 1u) / (SPLIT * BK) * BK)

// The convolution's workgroup (see main: fused with copies, it is offset by COPY_Z layers).
#ifdef COPY_Z
#define WORKGROUP (gl_WorkGroupID - uvec3(0u, 0u, COPY_Z))
#else
#define WORKGROUP gl_WorkGroupID
#endif

layout(local_size_x = THREADS) in;

layout(std430, binding = 0) readonly buffer Input { float x[]; };
layout(std430, binding = 1) readonly buffer Weights { float wt[]; };
layout(std430, binding = 2) readonly buffer Bias { float bias[]; };
layout(std430, binding = 3) writeonly buffer Output { float y[]; };

shared vec4 As[2][BK][BM / 4u];
shared vec4 Bs[2][BK][BN / 4u];

uint g;
uint slice;
uint m0;
uint q0;
uint k_end;
// This thread's quad of A (filters a_m + i * BM/4) and of B (positions, below).
uint a_m;
uint a_base;
// Per position of the B quad: the input offset of tap (0, 0) (modulo 2^32: it may point before
// the image) and its row and column; a position past the end gets a row that every bounds check
// rejects.
uvec4 b_base;
ivec4 b_iy;
ivec4 b_ix;

void position(uint q, out uint base, out int iy, out int ix) {
    uint pix = q % HOWO;
    iy = int((pix / WO) * SH) - int(PH);
    ix = int((pix % WO) * SW) - int(PW);
    base = (q / HOWO * C_IN + g * CG) * H * W + uint(iy * int(W) + ix);
    if (q >= NPOS) {
        iy = -0x40000000;
    }
}

#define QA (BM / 4u)
#define QB (BN / 4u)

// The quad of A at tap k (zero past the end).
vec4 load_a(uint k) {
    vec4 v = vec4(0.0);
    if (k < k_end) {
        uint i = a_base + k * MG;
#if A_FULL
        // Every filter tile is full: no filter bounds to check.
        v = vec4(wt[i], wt[i + QA], wt[i + 2u * QA], wt[i + 3u * QA]);
#else
        v.x = a_m < MG ? wt[i] : 0.0;
        v.y = a_m + QA < MG ? wt[i + QA] : 0.0;
        v.z = a_m + 2u * QA < MG ? wt[i + 2u * QA] : 0.0;
        v.w = a_m + 3u * QA < MG ? wt[i + 3u * QA] : 0.0;
#endif
    }
    return v;
}

// The input under tap k for the four positions of B (zero in the padding and past the end).
vec4 load_b(uint k) {
    vec4 v = vec4(0.0);
    if (k < k_end) {
        uint c = k / KHW;
        uint rs = k % KHW;
        int dy = int((rs / K_W) * DH);
        int dx = int((rs % K_W) * DW);
        uint off = c * H * W + uint(dy) * W + uint(dx);
        ivec4 iy = b_iy + dy;
        ivec4 ix = b_ix + dx;
        // Unsigned comparison: a negative row or column is out of bounds too.
        uvec4 ok = uvec4(lessThan(uvec4(iy), uvec4(H))) & uvec4(lessThan(uvec4(ix), uvec4(W)));
        uvec4 at = b_base + off;
        v.x = ok.x != 0u ? x[at.x] : 0.0;
        v.y = ok.y != 0u ? x[at.y] : 0.0;
        v.z = ok.z != 0u ? x[at.z] : 0.0;
        v.w = ok.w != 0u ? x[at.w] : 0.0;
    }
    return v;
}

void put(uint m, uint q, float v) {
    if (q < NPOS) {
        y[slice * (N * C_OUT * HOWO) + ((q / HOWO) * C_OUT + g * MG + m) * HOWO + q % HOWO] = v;
    }
}

// Four outputs of filter m (of this group): a quad of positions from q.
void store(uint m, uint q, vec4 v) {
    if (m < MG) {
#if HAS_BIAS
        if (SPLIT == 1u) {
            v += vec4(bias[g * MG + m]);
        }
#endif
        put(m, q, v.x);
        put(m, q + QB, v.y);
        put(m, q + 2u * QB, v.z);
        put(m, q + 3u * QB, v.w);
    }
}

void main() {
#ifdef COPY_Z
    // Fused with the streaming copies (stream_copy.glsl): the first COPY_Z layers of
    // workgroups copy, the rest convolve.
    if (gl_WorkGroupID.z < COPY_Z) {
        stream_copy((gl_WorkGroupID.z * gl_NumWorkGroups.y + gl_WorkGroupID.y)
            * gl_NumWorkGroups.x + gl_WorkGroupID.x);
        return;
    }
#endif
    g = WORKGROUP.z / SPLIT;
    slice = WORKGROUP.z % SPLIT;
    // Filter tiles vary fastest, so the tiles that share one window of the input run together
    // and find it in L2.
    m0 = WORKGROUP.x * BM;
    q0 = WORKGROUP.y * BN;
    const uint k_begin = slice * KSLICE;
    k_end = min(k_begin + KSLICE, KDIM);
    const uint tid = gl_LocalInvocationIndex;
    const uint tx = tid % (BN / TN);
    const uint ty = tid / (BN / TN);

    // Loads: thread tid takes quad a_quad of A in rows a_row + i * A_STEP of a step, and quad
    // b_quad of B in rows b_row + j * B_STEP.
    const uint a_quad = tid % QA;
    const uint a_row = tid / QA;
    const uint b_quad = tid % QB;
    const uint b_row = tid / QB;
    a_m = m0 + a_quad;
    a_base = g * KDIM * MG + a_m;
    const uint q = q0 + b_quad;
    position(q, b_base.x, b_iy.x, b_ix.x);
    position(q + QB, b_base.y, b_iy.y, b_ix.y);
    position(q + 2u * QB, b_base.z, b_iy.z, b_ix.z);
    position(q + 3u * QB, b_base.w, b_iy.w, b_ix.w);

    DECL_ACC
    DECL_PREFETCH
    LOAD_GLOBAL(k_begin)
    STORE_SHARED(0u)
    // barrier() orders shared-memory accesses in compute shaders (GLSL 4.30, 8.16): no
    // memoryBarrierShared() needed.
    barrier();
    uint buf = 0u;
    for (uint k0 = k_begin; k0 < k_end; k0 += BK) {
        // Unconditional: past the slice's end, load_a and load_b give zeros, and the other
        // buffer is not read again before the loop ends.
        LOAD_GLOBAL(k0 + BK)
        STEP(buf)
        STORE_SHARED(buf ^ 1u)
        barrier();
        buf ^= 1u;
    }
    STORE_ACC
}
