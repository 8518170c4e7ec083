// conv2d_narrow.comp: implicit-GEMM 2-D convolution for narrow groups (fewer than 16 filters per
// group, depthwise included), fp32, NCHW input, NKHW output; weights resident transposed as
// [group][tap][filter] (see src/gpu/mod.rs). Scalar tiles of any size; conv2d_tiled.comp is the
// fast kernel for wide groups.
//
// `#version` and the `#define`s are prepended from Rust (src/gpu/shaders.rs):
//   tile:  BM filters and BN output positions per workgroup, BK taps per step through shared
//          memory, TM x TN outputs per thread (strided, so neighbouring threads touch
//          neighbouring positions: coalesced reads and writes, no bank conflicts); THREADS = (BM/TM)*(BN/TN), given
//          as a number because GLSL 4.30 wants a literal in local_size_x
//   shape: N C_IN H W C_OUT K_H K_W SH SW PH PW DH DW GROUPS HO WO (unsigned), HAS_BIAS (0/1)
// The GEMM of group g (workgroup z): C[m][q] = sum_k A[m][k] B[k][q] with m a filter of the group,
// q = (image, y, x) an output position and k = (c, r, s) a tap. B is gathered straight from the
// input (implicit GEMM: no im2col buffer); taps that fall in the padding read zero.

#define CG (C_IN / GROUPS)
#define MG (C_OUT / GROUPS)
#define KDIM (CG * K_H * K_W)
#define NPOS (N * HO * WO)

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

shared float As[BK][BM];
shared float Bs[BK][BN];

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
    const uint g = WORKGROUP.z;
    const uint m0 = WORKGROUP.y * BM;
    const uint q0 = WORKGROUP.x * BN;
    const uint tid = gl_LocalInvocationIndex;
    const uint tx = tid % (BN / TN);
    const uint ty = tid / (BN / TN);

    float acc[TM][TN];
    for (uint i = 0u; i < TM; i++) {
        for (uint j = 0u; j < TN; j++) {
            acc[i][j] = 0.0;
        }
    }

    for (uint k0 = 0u; k0 < KDIM; k0 += BK) {
        // A tile: BK taps of BM filters (weights rows are contiguous in k).
        for (uint i = tid; i < BM * BK; i += THREADS) {
            uint kk = i % BK;
            uint mm = i / BK;
            uint m = m0 + mm;
            uint k = k0 + kk;
            As[kk][mm] = (m < MG && k < KDIM) ? wt[(g * KDIM + k) * MG + m] : 0.0;
        }
        // B tile: BK taps of BN positions, consecutive threads on consecutive positions.
        for (uint i = tid; i < BK * BN; i += THREADS) {
            uint qq = i % BN;
            uint kk = i / BN;
            uint q = q0 + qq;
            uint k = k0 + kk;
            float v = 0.0;
            if (q < NPOS && k < KDIM) {
                uint c = k / (K_H * K_W);
                uint rs = k % (K_H * K_W);
                uint r = rs / K_W;
                uint s = rs % K_W;
                uint img = q / (HO * WO);
                uint pix = q % (HO * WO);
                uint oy = pix / WO;
                uint ox = pix % WO;
                int iy = int(oy * SH + r * DH) - int(PH);
                int ix = int(ox * SW + s * DW) - int(PW);
                if (iy >= 0 && iy < int(H) && ix >= 0 && ix < int(W)) {
                    v = x[((img * C_IN + g * CG + c) * H + uint(iy)) * W + uint(ix)];
                }
            }
            Bs[kk][qq] = v;
        }
        barrier();
        for (uint kk = 0u; kk < BK; kk++) {
            float a[TM];
            float b[TN];
            for (uint i = 0u; i < TM; i++) {
                a[i] = As[kk][ty + i * (BM / TM)];
            }
            for (uint j = 0u; j < TN; j++) {
                b[j] = Bs[kk][tx + j * (BN / TN)];
            }
            for (uint i = 0u; i < TM; i++) {
                for (uint j = 0u; j < TN; j++) {
                    acc[i][j] = fma(a[i], b[j], acc[i][j]);
                }
            }
        }
        barrier();
    }

    for (uint i = 0u; i < TM; i++) {
        uint m = m0 + ty + i * (BM / TM);
        if (m >= MG) {
            continue;
        }
#if HAS_BIAS
        float bv = bias[g * MG + m];
#else
        float bv = 0.0;
#endif
        for (uint j = 0u; j < TN; j++) {
            uint q = q0 + tx + j * (BN / TN);
            if (q < NPOS) {
                uint img = q / (HO * WO);
                uint pix = q % (HO * WO);
                y[(img * C_OUT + g * MG + m) * (HO * WO) + pix] = acc[i][j] + bv;
            }
        }
    }
}
