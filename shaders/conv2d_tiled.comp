// conv2d_tiled.comp: the fast implicit-GEMM 2-D convolution for groups of 16 or more filters,
// fp32, NCHW input, NKHW output; weights resident transposed as [group][tap][filter].
//
// `#version` and the `#define`s are prepended from Rust (src/gpu/shaders.rs):
//   tile:  BM filters x BN output positions per workgroup, BK taps per step, TM x TN outputs per
//          thread (multiples of 4: read from shared memory four floats at a time), THREADS = (BM/TM)*(BN/TN),
//          with THREADS a multiple of BM and of BN (each thread loads one fixed column of A and B)
//   shape: N C_IN H W C_OUT K_H K_W SH SW PH PW DH DW GROUPS HO WO (unsigned), HAS_BIAS (0/1)
// Per group g (workgroup z; x: filter tiles, y: position tiles): C[m][q] = sum_k A[k][m] B[k][q]; m a filter, q = (image, y, x) an
// output position, k = (c, r, s) a tap. B is gathered from the input (no im2col buffer).
// The next step's global loads are held in registers while the current step computes from
// shared memory (register double buffering). A thread's outputs are TM/4 groups of 4 rows and
// TN/4 groups of 4 columns, spread so that shared-memory reads are broadcasts or conflict-free.

#define CG (C_IN / GROUPS)
#define MG (C_OUT / GROUPS)
#define KHW (K_H * K_W)
#define KDIM (CG * KHW)
#define HOWO (HO * WO)
#define NPOS (N * HOWO)
#define A_LOADS ((BM * BK + THREADS - 1u) / THREADS)
#define B_LOADS ((BK * BN + THREADS - 1u) / THREADS)
#define TMV (TM / 4u)
#define TNV (TN / 4u)

layout(local_size_x = THREADS) in;

layout(std430, binding = 0) readonly buffer Input { float x[]; };
layout(std430, binding = 1) readonly buffer Weights { float wt[]; };
layout(std430, binding = 2) readonly buffer Bias { float bias[]; };
layout(std430, binding = 3) writeonly buffer Output { float y[]; };

shared float As[BK][BM];
shared float Bs[BK][BN];

void main() {
    const uint g = gl_WorkGroupID.z;
    // Filter tiles vary fastest, so the tiles that share one window of the input run together
    // and find it in L2.
    const uint m0 = gl_WorkGroupID.x * BM;
    const uint q0 = gl_WorkGroupID.y * BN;
    const uint tid = gl_LocalInvocationIndex;
    const uint tx = tid % (BN / TN);
    const uint ty = tid / (BN / TN);

    // This thread's fixed column of A (a filter) and of B (an output position).
    const uint mm = tid % BM;
    const bool m_ok = m0 + mm < MG;
    const uint a_base = g * KDIM * MG + m0 + mm;
    const uint nn = tid % BN;
    const uint q = q0 + nn;
    const bool q_ok = q < NPOS;
    const uint img = q / HOWO;
    const uint pix = q % HOWO;
    const int iy0 = int((pix / WO) * SH) - int(PH);
    const int ix0 = int((pix % WO) * SW) - int(PW);
    const uint x_base = (img * C_IN + g * CG) * H * W;

    float pa[A_LOADS];
    float pb[B_LOADS];
    float acc[TM][TN];
    for (uint i = 0u; i < TM; i++) {
        for (uint j = 0u; j < TN; j++) {
            acc[i][j] = 0.0;
        }
    }

    // Global loads of the step starting at tap k0 into registers.
#define LOAD(k0)                                                                   \
    for (uint l = 0u; l < A_LOADS; l++) {                                          \
        uint e = tid + l * THREADS;                                                \
        uint k = (k0) + e / BM;                                                    \
        pa[l] = (e < BM * BK && m_ok && k < KDIM) ? wt[a_base + k * MG] : 0.0;     \
    }                                                                              \
    for (uint l = 0u; l < B_LOADS; l++) {                                          \
        uint e = tid + l * THREADS;                                                \
        uint k = (k0) + e / BN;                                                    \
        float v = 0.0;                                                             \
        if (e < BK * BN && q_ok && k < KDIM) {                                     \
            uint c = k / KHW;                                                      \
            uint rs = k % KHW;                                                     \
            int iy = iy0 + int((rs / K_W) * DH);                                   \
            int ix = ix0 + int((rs % K_W) * DW);                                   \
            if (iy >= 0 && iy < int(H) && ix >= 0 && ix < int(W)) {                \
                v = x[x_base + (c * H + uint(iy)) * W + uint(ix)];                 \
            }                                                                      \
        }                                                                          \
        pb[l] = v;                                                                 \
    }

    LOAD(0u)
    for (uint k0 = 0u; k0 < KDIM; k0 += BK) {
        for (uint l = 0u; l < A_LOADS; l++) {
            uint e = tid + l * THREADS;
            if (e < BM * BK) {
                As[e / BM][mm] = pa[l];
            }
        }
        for (uint l = 0u; l < B_LOADS; l++) {
            uint e = tid + l * THREADS;
            if (e < BK * BN) {
                Bs[e / BN][nn] = pb[l];
            }
        }
        barrier();
        if (k0 + BK < KDIM) {
            LOAD(k0 + BK)
        }
        for (uint kk = 0u; kk < BK; kk++) {
            vec4 a[TMV];
            vec4 b[TNV];
            // Four consecutive, 16-byte aligned floats: one 128-bit shared-memory read each.
            for (uint i = 0u; i < TMV; i++) {
                uint r = 4u * (i * (BM / TM) + ty);
                a[i] = vec4(As[kk][r], As[kk][r + 1u], As[kk][r + 2u], As[kk][r + 3u]);
            }
            for (uint j = 0u; j < TNV; j++) {
                uint c = 4u * (j * (BN / TN) + tx);
                b[j] = vec4(Bs[kk][c], Bs[kk][c + 1u], Bs[kk][c + 2u], Bs[kk][c + 3u]);
            }
            for (uint i = 0u; i < TMV; i++) {
                for (uint ii = 0u; ii < 4u; ii++) {
                    for (uint j = 0u; j < TNV; j++) {
                        for (uint jj = 0u; jj < 4u; jj++) {
                            acc[i * 4u + ii][j * 4u + jj] = fma(a[i][ii], b[j][jj], acc[i * 4u + ii][j * 4u + jj]);
                        }
                    }
                }
            }
        }
        barrier();
    }

    for (uint i = 0u; i < TMV; i++) {
        for (uint ii = 0u; ii < 4u; ii++) {
            uint m = m0 + 4u * (i * (BM / TM) + ty) + ii;
            if (m >= MG) {
                continue;
            }
#if HAS_BIAS
            float bv = bias[g * MG + m];
#else
            float bv = 0.0;
#endif
            for (uint j = 0u; j < TNV; j++) {
                for (uint jj = 0u; jj < 4u; jj++) {
                    uint qo = q0 + 4u * (j * (BN / TN) + tx) + jj;
                    if (qo < NPOS) {
                        y[((qo / HOWO) * C_OUT + g * MG + m) * HOWO + qo % HOWO] = acc[i * 4u + ii][j * 4u + jj] + bv;
                    }
                }
            }
        }
    }
}
