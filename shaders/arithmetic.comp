// arithmetic.comp: the GPU's arithmetic class, measured rather than guessed from its name
// (src/gpu/arithmetic.rs). The convolution kernels accumulate with GLSL's fma(), which an
// implementation may round once (fused) or twice (a product, then a sum); and a GPU may flush
// subnormal results to zero. Those two facts, with the plan that runs, fix a kernel's output
// bits, so they name its fingerprints (src/validate/golden.rs).
// Inputs come from the buffer, so the compiler cannot fold them; `#version` prepended from Rust.
//
// v[0], v[1], v[2] = a, b, c with a*b + c exact only if fused (a = b = 1 + 2^-12,
// c = -(1 + 2^-11): fused gives 2^-24, rounded twice gives 0).
// v[3] = s = 2^-70: s * s = 2^-140 is subnormal (kept, or flushed to zero).

layout(local_size_x = 1) in;

layout(std430, binding = 0) buffer Probe { float v[]; };

void main() {
    float a = v[0], b = v[1], c = v[2], s = v[3];
    // The scalar form, and the vec4 form the tiled kernel uses.
    v[4] = fma(a, b, c);
    vec4 acc = vec4(c);
    acc = fma(vec4(a), vec4(b), acc);
    v[5] = acc.x;
    v[6] = s * s;
}
