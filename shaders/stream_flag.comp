// stream_flag.comp: after a synchronous call's convolution (and a storage barrier), writes the
// call's serial into its frame's flag, on which CUDA's stream for copies out waits
// (cuStreamWaitValue32) before it copies the output out, so that the host does not wait for the
// convolution between them (src/gpu/step.rs). One invocation; "#version" is prepended from Rust
// (src/gpu/shaders.rs).

layout(local_size_x = 1) in;

layout(std430, binding = 0) coherent writeonly buffer Flag {
    uint flag[];
};

// serial.x: the call's serial in its frame (from 1, rising).
uniform uvec4 serial;

void main() {
    flag[0] = serial.x;
}
