//! The weight and bias sets a backend keeps as shared buffers between calls, found by content
//! (length and a hash of every byte: [`WeightsKey`], the key resident weights are found by),
//! by allocation (a caller's own `Arc<[f32]>`, which cannot change while it is kept), or
//! guessed by the address of the caller's slice (a guess the executor checks before it answers).
//!
//! A caller's slice must be hashed on every call (its bytes may have changed since the last);
//! a caller's `Arc` only the first time it is seen. The guess lets a synchronous call convolve
//! while its slice is being hashed: on the H200's host a hash of #4's 2.4 MB takes about 90 µs,
//! four times its kernel.

#![forbid(unsafe_code)]

use super::resident::{SharedWeights, WeightsKey};
use std::sync::{Arc, Mutex, MutexGuard};

/// Sets kept at most: this many ...
const SETS_MAX: usize = 16;
/// ... and this many bytes (the oldest go first; the newest always stays).
const SETS_BYTES: usize = 256 << 20;

/// One kept set.
struct Kept {
    key: WeightsKey,
    data: Arc<[f32]>,
    /// Address and length of the caller's slice it was last keyed from.
    at: Option<(usize, usize)>,
}

/// The kept sets, most recently used last.
#[derive(Default)]
pub(super) struct KeptSets(Mutex<Vec<Kept>>);

impl KeptSets {
    /// The caller's slice `v` as a shared set, keyed by a hash of every byte: the kept set with
    /// that key, else a copy, kept; remembered as what the slice at `v`'s address holds now.
    pub(super) fn of_slice(&self, v: &[f32]) -> SharedWeights {
        let key = WeightsKey::of(v);
        let mut sets = self.lock();
        let i = keep(&mut sets, key, || v.into());
        let at = Some(address(v));
        for s in sets.iter_mut().filter(|s| s.at == at) {
            s.at = None;
        }
        sets[i].at = at;
        shared(&sets[i])
    }

    /// The caller's shared buffer `v` as a kept set: found without a hash when this same
    /// allocation is kept, else keyed by a hash of every byte and kept as it is (no copy), in
    /// place of an equal kept set, so that the next call with it pays no hash.
    pub(super) fn of_shared(&self, v: Arc<[f32]>) -> SharedWeights {
        if let Some(found) = self.find(|s| Arc::ptr_eq(&s.data, &v)) {
            return found;
        }
        let key = WeightsKey::of(&v);
        let mut sets = self.lock();
        let i = keep(&mut sets, key, || Arc::clone(&v));
        sets[i].data = v;
        shared(&sets[i])
    }

    /// The set the caller's slice at `v`'s address and of its length held when it was last
    /// keyed: a guess, since its bytes may have changed since.
    pub(super) fn guess(&self, v: &[f32]) -> Option<SharedWeights> {
        let at = Some(address(v));
        self.find(|s| s.at == at)
    }

    /// The kept set that `is`, moved to most recently used.
    fn find(&self, is: impl Fn(&Kept) -> bool) -> Option<SharedWeights> {
        let mut sets = self.lock();
        let i = sets.iter().position(is)?;
        let kept = sets.remove(i);
        sets.push(kept);
        sets.last().map(shared)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Kept>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn address(v: &[f32]) -> (usize, usize) {
    (v.as_ptr() as usize, v.len())
}

fn shared(s: &Kept) -> SharedWeights {
    SharedWeights {
        data: Arc::clone(&s.data),
        key: s.key,
    }
}

/// The index of the set in `sets` with `key`, moved to most recently used, or of `make()`'s,
/// kept; the oldest go past [`SETS_MAX`] sets or [`SETS_BYTES`] (the newest always stays).
fn keep(sets: &mut Vec<Kept>, key: WeightsKey, make: impl FnOnce() -> Arc<[f32]>) -> usize {
    let kept = match sets.iter().position(|s| s.key == key) {
        Some(i) => sets.remove(i),
        None => Kept {
            key,
            data: make(),
            at: None,
        },
    };
    sets.push(kept);
    let bytes = |sets: &[Kept]| -> usize { sets.iter().map(|s| s.data.len() * 4).sum() };
    while sets.len() > 1 && (sets.len() > SETS_MAX || bytes(sets) > SETS_BYTES) {
        sets.remove(0);
    }
    sets.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shared set is found as its own allocation without a key, an equal one by its key (and
    /// then kept in place of the kept one, so found by allocation next time), different bytes
    /// are a new set; the oldest sets go past the count budget.
    #[test]
    fn kept_sets_are_found_by_allocation_or_content() {
        let sets = KeptSets::default();
        let a: Arc<[f32]> = vec![1.0f32, 2.0, 3.0].into();
        let w = sets.of_shared(Arc::clone(&a));
        assert!(
            w.key == WeightsKey::of(&a) && Arc::ptr_eq(&w.data, &a),
            "kept as it is"
        );
        assert!(sets.find(|s| Arc::ptr_eq(&s.data, &a)).is_some());
        // The same bytes in another allocation: found by key, and kept from now on.
        let copy: Arc<[f32]> = a.to_vec().into();
        let w = sets.of_shared(Arc::clone(&copy));
        assert!(w.key == WeightsKey::of(&a) && Arc::ptr_eq(&w.data, &copy));
        assert!(sets.find(|s| Arc::ptr_eq(&s.data, &copy)).is_some());
        assert!(
            sets.find(|s| Arc::ptr_eq(&s.data, &a)).is_none(),
            "one set per key"
        );
        // A slice with those bytes: the kept set serves it, no copy.
        let w = sets.of_slice(&a);
        assert!(Arc::ptr_eq(&w.data, &copy));
        // Other bytes: another key, another set.
        let b: Arc<[f32]> = vec![1.0f32, 2.0, 3.5].into();
        let w = sets.of_shared(Arc::clone(&b));
        assert!(w.key != WeightsKey::of(&a) && Arc::ptr_eq(&w.data, &b));
        assert_eq!(sets.lock().len(), 2);
        for i in 0..2 * SETS_MAX {
            sets.of_shared(vec![i as f32].into());
        }
        assert_eq!(sets.lock().len(), SETS_MAX, "at most SETS_MAX sets");
        assert!(
            sets.find(|s| Arc::ptr_eq(&s.data, &b)).is_none(),
            "the oldest went first"
        );
    }

    /// A slice's guess is the set it held when last keyed, by address and length; changing
    /// its bytes leaves the guess (now wrong, which the executor's check catches) until it is
    /// keyed again; another slice has no guess.
    #[test]
    fn a_slice_is_guessed_by_its_address_until_keyed_again() {
        let sets = KeptSets::default();
        let mut w = vec![1.0f32, 2.0, 3.0, 4.0];
        assert!(sets.guess(&w).is_none(), "never keyed");
        let first = sets.of_slice(&w);
        assert_eq!(sets.guess(&w).map(|g| g.key), Some(first.key));
        assert!(sets.guess(&w[..3]).is_none(), "another length");
        let other = w.clone();
        assert!(sets.guess(&other).is_none(), "another address");
        w[2] = 3.5;
        assert_eq!(sets.guess(&w).map(|g| g.key), Some(first.key), "stale");
        let second = sets.of_slice(&w);
        assert_ne!(second.key, first.key);
        assert_eq!(sets.guess(&w).map(|g| g.key), Some(second.key));
        // Back to the first bytes: the first set again, and only it answers for the address.
        w[2] = 3.0;
        assert_eq!(sets.of_slice(&w).key, first.key);
        assert_eq!(sets.guess(&w).map(|g| g.key), Some(first.key));
        assert_eq!(sets.lock().iter().filter(|s| s.at.is_some()).count(), 1);
    }
}
