//! `.npy` reading and writing for float32 arrays (little-endian, C order).
//!
//! The header is parsed by the `npyz` crate; sporkle then insists on exactly what it computes
//! with: dtype `<f4`, C order, and a data section of exactly the size the shape says. Anything
//! else (other dtypes, Fortran order, truncated or over-long files, malformed headers) is an
//! [`Error::Npy`] naming the file and the problem. Writing goes to a temporary file in the same
//! directory that is renamed into place, so a failed write never leaves a partial file.

#![forbid(unsafe_code)]

use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// A float32 array read from a `.npy` file.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Elements in C order.
    pub data: Vec<f32>,
}

fn err(path: &Path, problem: impl Into<String>) -> Error {
    Error::Npy {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

/// Reads a float32, little-endian, C-order `.npy` file.
pub fn read(path: &Path) -> Result<Array> {
    let bytes = std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    parse(path, &bytes)
}

/// Parses the bytes of a `.npy` file (`path` only names it in errors).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Array> {
    let mut cursor = std::io::Cursor::new(bytes);
    let header = npyz::NpyHeader::from_reader(&mut cursor)
        .map_err(|e| err(path, format!("not a valid .npy file: {e}")))?;
    let dtype = header.dtype().descr();
    if dtype != "'<f4'" {
        return Err(err(
            path,
            format!("dtype is {dtype}, but sporkle needs float32 little-endian ('<f4')"),
        ));
    }
    if header.order() == npyz::Order::Fortran {
        return Err(err(
            path,
            "array is in Fortran order; sporkle needs C order (numpy.ascontiguousarray)",
        ));
    }
    let shape: Vec<usize> = header.shape().iter().map(|&d| d as usize).collect();
    let count = header
        .shape()
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&c| c <= (isize::MAX as u64) / 4)
        .ok_or_else(|| err(path, format!("shape {shape:?} is too large")))?;
    let data = &bytes[cursor.position() as usize..];
    let want = count * 4;
    if (data.len() as u64) < want {
        return Err(err(
            path,
            format!(
                "truncated: shape {shape:?} needs {want} data bytes, the file has {}",
                data.len()
            ),
        ));
    }
    if (data.len() as u64) > want {
        return Err(err(
            path,
            format!(
                "{} bytes after the data of shape {shape:?}",
                data.len() as u64 - want
            ),
        ));
    }
    let data = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(Array { shape, data })
}

/// Writes `data` with `shape` as a float32, little-endian, C-order `.npy` file.
///
/// - A regular file (or a new one) is written atomically: into a temporary file beside it,
///   then renamed over it, so a failed write leaves the old file or none.
/// - A symbolic link is followed: the file it points to is written, and the link stays a link.
/// - What is not a regular file (a device such as `/dev/stdout`, a pipe) is written directly,
///   never replaced; a directory is an error.
pub fn write(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let count: usize = shape.iter().product();
    if count != data.len() {
        return Err(err(
            path,
            format!("shape {shape:?} needs {count} elements, got {}", data.len()),
        ));
    }
    if path.as_os_str().to_string_lossy().ends_with('/') {
        return Err(err(path, "is a directory name, not a file name"));
    }
    let bytes = encode(shape, data).map_err(|e| err(path, format!("cannot encode: {e}")))?;
    let cannot = |e: std::io::Error| err(path, format!("cannot write: {e}"));
    let in_place = |at: &Path| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(at)
            .and_then(|mut f| f.write_all(&bytes))
            .map_err(cannot)
    };
    let target = match follow_links(path)? {
        // The process's own output: written through it, where the rest of the output goes.
        Target::Descriptor(1) => {
            let mut out = std::io::stdout().lock();
            return out
                .write_all(&bytes)
                .and_then(|()| out.flush())
                .map_err(cannot);
        }
        Target::Descriptor(2) => return std::io::stderr().write_all(&bytes).map_err(cannot),
        Target::Descriptor(n) => {
            return in_place(Path::new(&format!("/proc/self/fd/{n}")));
        }
        Target::Path(target) => target,
    };
    match std::fs::metadata(&target) {
        Ok(m) if m.is_dir() => return Err(err(path, "is a directory, not a file")),
        // A device or a pipe: written in place (renaming over it would replace it).
        Ok(m) if !m.is_file() => return in_place(&target),
        _ => {}
    }
    let dir = target
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .ok_or_else(|| err(path, "not a file name"))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, &target));
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        cannot(e)
    })
}

/// Where a path written to leads.
enum Target {
    /// One of the process's open files (`/dev/stdout`, `/dev/fd/N`, `/proc/self/fd/N`).
    Descriptor(u32),
    /// A path through no more links (the last one may dangle: then it is the file to create).
    Path(std::path::PathBuf),
}

/// Follows `path` through symbolic links.
fn follow_links(path: &Path) -> Result<Target> {
    let mut at = path.to_path_buf();
    for _ in 0..40 {
        let name = at.to_string_lossy();
        let fd = match name.as_ref() {
            "/dev/stdin" => Some(0),
            "/dev/stdout" => Some(1),
            "/dev/stderr" => Some(2),
            n => n
                .strip_prefix("/dev/fd/")
                .or_else(|| n.strip_prefix("/proc/self/fd/"))
                .and_then(|d| d.parse().ok()),
        };
        if let Some(fd) = fd {
            return Ok(Target::Descriptor(fd));
        }
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = std::fs::read_link(&at).map_err(|e| err(path, format!("{e}")))?;
                at = match at.parent() {
                    Some(dir) if to.is_relative() => dir.join(to),
                    _ => to,
                };
            }
            _ => return Ok(Target::Path(at)),
        }
    }
    Err(err(path, "too many levels of symbolic links"))
}

/// The bytes of a float32 `.npy` file.
fn encode(shape: &[usize], data: &[f32]) -> std::io::Result<Vec<u8>> {
    use npyz::WriterBuilder;
    let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut out = Vec::with_capacity(128 + data.len() * 4);
    let mut w = npyz::WriteOptions::<f32>::new()
        .dtype(npyz::DType::Plain(
            "<f4".parse().expect("a valid type string"),
        ))
        .shape(&shape)
        .writer(&mut out)
        .begin_nd()?;
    w.extend(data.iter().copied())?;
    w.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(descr: &str, fortran: bool, shape: &str) -> Vec<u8> {
        let mut h = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
            if fortran { "True" } else { "False" }
        );
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        write(&path, &[2, 3, 4], &data).unwrap();
        assert_eq!(
            read(&path).unwrap(),
            Array {
                shape: vec![2, 3, 4],
                data: data.clone()
            }
        );
        write(&path, &[24], &data).unwrap();
        assert_eq!(read(&path).unwrap().shape, vec![24]);
        assert!(write(&path, &[5], &data).is_err());
    }

    #[test]
    fn wrong_files_name_the_problem() {
        let p = Path::new("x.npy");
        let msg = |b: &[u8]| parse(p, b).unwrap_err().to_string();
        let mut f8 = header("<f8", false, "(2,)");
        f8.extend_from_slice(&[0; 16]);
        assert!(msg(&f8).contains("dtype is '<f8'"), "{}", msg(&f8));
        let mut be = header(">f4", false, "(2,)");
        be.extend_from_slice(&[0; 8]);
        assert!(msg(&be).contains("'>f4'"));
        let mut fortran = header("<f4", true, "(2, 2)");
        fortran.extend_from_slice(&[0; 16]);
        assert!(msg(&fortran).contains("Fortran order"));
        let mut short = header("<f4", false, "(2, 3)");
        short.extend_from_slice(&[0; 20]);
        assert!(msg(&short).contains("truncated"));
        let mut long = header("<f4", false, "(1,)");
        long.extend_from_slice(&[0; 8]);
        assert!(msg(&long).contains("4 bytes after"));
        assert!(msg(b"not numpy at all").contains("not a valid .npy"));
        assert!(msg(&header("<f4", false, "(2,")[..30]).contains("x.npy"));
        assert!(read(Path::new("/nonexistent/y.npy"))
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/y.npy"));
    }
}
