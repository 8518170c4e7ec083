//! Resident weights: weight sets kept on the GPU between calls, laid out for the algorithm that
//! reads them, found by content.
//!
//! A set is identified exactly: by its length and an xxh3-64 hash of every byte
//! ([`WeightsKey`]; measured on the development machine, one core: 2.36 MiB, the largest
//! benchmark's weights, in 0.079 ms = 31 GB/s; 64 MiB in 2.8 ms = 24 GB/s; a changed element
//! changes the key except with probability 2⁻⁶⁴, and the unit test below checks every
//! single-element change). Several sets stay resident up to a byte budget, the least recently
//! used evicted first.

#![forbid(unsafe_code)]

use super::gl::Buffer;
use super::host_copy;
use super::plan::Algorithm;
use super::shaders::WINOGRAD_VARIANT;
use crate::error::Result;
use crate::params::Conv2dParams;
use std::rc::Rc;
use std::sync::Arc;

/// Bytes of weights kept resident at once.
const WEIGHTS_BUDGET: usize = 512 << 20;

/// The identity of a weight set: length and a hash of every byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct WeightsKey {
    len: usize,
    hash: u64,
}

impl WeightsKey {
    pub(crate) fn of(w: &[f32]) -> Self {
        Self {
            len: w.len(),
            hash: host_copy::parallel_hash(bytemuck::cast_slice(w)),
        }
    }
}

/// A weight set shared with the jobs that use it, and its key.
#[derive(Clone)]
pub(crate) struct SharedWeights {
    pub(crate) data: Arc<[f32]>,
    pub(crate) key: WeightsKey,
}

impl SharedWeights {
    /// `data`, keyed (a hash of every byte).
    pub(crate) fn new(data: Arc<[f32]>) -> Self {
        Self {
            key: WeightsKey::of(&data),
            data,
        }
    }
}

/// One resident weight set, laid out for one algorithm.
struct Resident {
    key: WeightsKey,
    algorithm: Algorithm,
    buffer: Buffer,
    last_used: u64,
}

/// The resident weight sets of one context.
pub(super) struct ResidentWeights {
    gl: Rc<glow::Context>,
    /// Buffers get immutable storage (GL_ARB_buffer_storage).
    immutable: bool,
    sets: Vec<Resident>,
    /// Counts uses, for least-recently-used eviction.
    clock: u64,
}

impl ResidentWeights {
    /// None yet, on the context whose functions are `gl`.
    pub(super) fn new(gl: Rc<glow::Context>, immutable: bool) -> Self {
        Self {
            gl,
            immutable,
            sets: Vec::new(),
            clock: 0,
        }
    }

    /// The buffer of resident set `i` (an index [`ResidentWeights::get`] returned).
    pub(super) fn buffer(&self, i: usize) -> &Buffer {
        &self.sets[i].buffer
    }

    /// Index of the resident copy of `w` for `algorithm`, uploading (and evicting) as needed.
    /// Resident weights are transposed to `[group][tap][filter]`, so the shaders read them
    /// coalesced; Winograd's are transformed first (they are its GEMM's weights).
    pub(super) fn get(
        &mut self,
        p: &Conv2dParams,
        key: WeightsKey,
        w: &[f32],
        algorithm: Algorithm,
    ) -> Result<(usize, bool)> {
        self.clock += 1;
        if let Some(i) = self
            .sets
            .iter()
            .position(|r| r.key == key && r.algorithm == algorithm)
        {
            self.sets[i].last_used = self.clock;
            return Ok((i, false));
        }
        let (p, w) = match algorithm {
            Algorithm::Direct => (*p, std::borrow::Cow::Borrowed(w)),
            Algorithm::Winograd => (
                crate::winograd::gemm_params(p, WINOGRAD_VARIANT),
                std::borrow::Cow::Owned(crate::winograd::transform_weights(p, w, WINOGRAD_VARIANT)),
            ),
        };
        let bytes = |v: &Vec<Resident>| v.iter().map(|r| r.buffer.len() * 4).sum::<usize>();
        while !self.sets.is_empty() && bytes(&self.sets) + w.len() * 4 > WEIGHTS_BUDGET {
            let lru = (0..self.sets.len())
                .min_by_key(|&i| self.sets[i].last_used)
                .unwrap_or(0);
            self.sets.swap_remove(lru);
        }
        let (mg, kdim) = (p.c_out_per_group(), p.reduction_len());
        let mut transposed = vec![0.0f32; w.len()];
        for (g, (dst, src)) in transposed
            .chunks_exact_mut(mg * kdim)
            .zip(w.chunks_exact(mg * kdim))
            .enumerate()
        {
            debug_assert!(g < p.groups);
            for (m, row) in src.chunks_exact(kdim).enumerate() {
                for (k, &v) in row.iter().enumerate() {
                    dst[k * mg + m] = v;
                }
            }
        }
        let buffer = Buffer::new(&self.gl, w.len(), self.immutable)?;
        buffer.upload(&transposed)?;
        self.sets.push(Resident {
            key,
            algorithm,
            buffer,
            last_used: self.clock,
        });
        Ok((self.sets.len() - 1, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Identification is exact: a change to any one element (its lowest bit) changes the key.
    #[test]
    fn every_single_element_change_changes_the_weights_key() {
        let mut w = vec![0.0f32; 1000];
        crate::data::fill_uniform(5, &mut w);
        let base = WeightsKey::of(&w);
        for i in 0..w.len() {
            let old = w[i];
            w[i] = f32::from_bits(old.to_bits() ^ 1);
            assert_ne!(WeightsKey::of(&w), base, "element {i}");
            w[i] = old;
        }
        assert_eq!(WeightsKey::of(&w), base);
        assert_ne!(WeightsKey::of(&w[..999]), base, "length is part of the key");
    }
}
