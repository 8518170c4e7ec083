// stream_copy.comp: the streaming copies alone (a step of the executor with no convolution in
// it); stream_copy.glsl, prepended from Rust (src/gpu/shaders.rs), does the work.

layout(local_size_x = THREADS) in;

void main() {
    stream_copy(gl_WorkGroupID.x);
}
