//! Host memory a request may take: what the machine can still give (`MemAvailable` plus free
//! swap, from `/proc/meminfo`), and allocations that refuse what it cannot hold with an error
//! naming the request, before anything is allocated, instead of the allocator's abort.
//! Where the figure is unknown (not Linux), only the allocator's own refusal is caught.

#![forbid(unsafe_code)]

use crate::error::{Error, Result};

/// Bytes of memory the machine can still give, if it says.
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some(field("MemAvailable:")? + field("SwapFree:").unwrap_or(0))
}

/// Refuses `bytes` for `what` where the machine cannot hold them.
pub fn check(bytes: u64, what: &str) -> Result<()> {
    match available_bytes() {
        Some(available) if bytes > available => Err(Error::OutOfMemory(format!(
            "{what} needs {}, more than the {} this machine has available",
            human(bytes),
            human(available)
        ))),
        _ => Ok(()),
    }
}

/// A vector of `len` zeros for `what`, or an error if the machine cannot hold it.
pub fn zeroed(len: usize, what: &str) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    grow(&mut v, len, what)?;
    Ok(v)
}

/// Grows `v` with zeros to at least `len` floats for `what`, or fails without changing it.
pub fn grow(v: &mut Vec<f32>, len: usize, what: &str) -> Result<()> {
    if v.len() >= len {
        return Ok(());
    }
    let more = len - v.len();
    check((more as u64).saturating_mul(4), what)?;
    v.try_reserve_exact(more).map_err(|_| {
        Error::OutOfMemory(format!(
            "{what} needs {}, which could not be allocated",
            human((len as u64).saturating_mul(4))
        ))
    })?;
    v.resize(len, 0.0);
    Ok(())
}

/// Bytes for people: `1.3 TB`, `512 MB`.
fn human(bytes: u64) -> String {
    let units = ["bytes", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < units.len() {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.1} {}", units[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_the_machine_cannot_hold() {
        let e = zeroed(usize::MAX / 8, "a test buffer")
            .unwrap_err()
            .to_string();
        assert!(e.contains("a test buffer needs"), "{e}");
        let mut v = vec![1.0f32; 3];
        assert!(grow(&mut v, usize::MAX / 8, "more").is_err());
        assert_eq!(v, [1.0; 3], "a refused growth changes nothing");
        grow(&mut v, 5, "a little").unwrap();
        assert_eq!(v, [1.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!(human(1_280_000_000_000), "1.3 TB");
        assert_eq!(human(12), "12 bytes");
        if cfg!(target_os = "linux") {
            assert!(available_bytes().is_some_and(|b| b > 0));
        }
    }
}
