use sporkle::cpu::kernel::{Microkernel, TapOffsets};
use std::time::Instant;
fn main() {
    let k = Microkernel::detect();
    for (name, stride, kc) in [("L1 packed", 16usize, 256usize), ("plane 196", 196, 256), ("plane 3136", 3136, 64), ("plane 200 aligned", 208, 256)] {
        let mut offs = TapOffsets::default();
        offs.fill((0..kc).map(|i| i * stride));
        let b = vec![1.0f32; kc * stride + 256];
        let a = vec![0.5f32; kc * 16];
        let mut c = vec![0.0f32; 16 * 16 * 16];
        let iters = 200_000usize;
        let t = Instant::now();
        for it in 0..iters {
            let j = (it % 8) * 16;
            k.run(&a, &offs, 0, kc, &b[j..], &mut c, 256, true);
        }
        let s = t.elapsed().as_secs_f64();
        println!("{name}: {:.1} GFLOP/s", (iters * kc * 512) as f64 / s / 1e9);
    }
}
