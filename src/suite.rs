//! Suite files (`suites/*.toml`): device-independent convolution cases, one vocabulary with
//! the Rust names.
//!
//! ```toml
//! description = "what this suite is for"
//!
//! [[case]]
//! name = "l1_3x3_56_64_n1"      # unique within the suite; used in trial and benchmark names
//! n = 1                         # batch
//! c_in = 64
//! h = 56
//! w = 56
//! c_out = 64
//! k_h = 3
//! k_w = 3
//! stride = 1                    # S or [SH, SW]; default 1
//! padding = 1                   # P, [PH, PW], [T, L, B, R], "same", "same-lower", "valid"; default 0
//! dilation = 1                  # D or [DH, DW]; default 1
//! groups = 1                    # default 1
//! bias = false                  # default false
//! exact = false                 # small-integer data, bit-identical results demanded; default false
//! seed = 1                      # data seed; default: derived from the name
//! pins = "what bug this pins"   # regression suite: required, says which bug the case pins
//! xfail = { gpu = "reason" }    # devices where the case is expected to fail, and why
//!
//! [[case]]                      # the same shape as a benchdnn problem descriptor (crate::desc)
//! desc = "mb1ic64ih56oc64kh3ph1" # instead of n ... groups; name defaults to its n"..." or itself
//! ```
//! Unknown keys are errors, so a typo never silently drops a setting; a case gives its shape
//! either by the keys above or by `desc`, never both.

#![forbid(unsafe_code)]

use crate::error::{Error, Result};
use crate::params::{Conv2dParams, PaddingSpec};
use serde::Deserialize;
use std::path::Path;

/// A suite: a description and its cases.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    /// What the suite is for.
    #[serde(default)]
    pub description: String,
    /// The cases, in file order.
    #[serde(rename = "case", default)]
    pub cases: Vec<Case>,
}

/// One convolution case.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    /// Unique name within its suite.
    pub name: String,
    /// The convolution.
    pub params: Conv2dParams,
    /// Whether the case adds a bias.
    pub bias: bool,
    /// Small-integer data and bit-identical results.
    pub exact: bool,
    /// Data seed.
    pub seed: u64,
    /// The bug a regression case pins.
    pub pins: Option<String>,
    /// Devices (by kind name) where the case is expected to fail, with the reason.
    pub xfail: std::collections::BTreeMap<String, String>,
}

/// A per-axis pair written as one number or two.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(untagged)]
enum Pair {
    Same(usize),
    Each([usize; 2]),
}

/// `padding`: one number, a list (2 or 4), or a rule's name.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum PaddingValue {
    One(usize),
    List(Vec<usize>),
    Rule(String),
}

impl PaddingValue {
    fn spec(&self) -> std::result::Result<PaddingSpec, String> {
        match self {
            PaddingValue::One(p) => PaddingSpec::from_numbers(&[*p]),
            PaddingValue::List(v) => PaddingSpec::from_numbers(v),
            PaddingValue::Rule(r) => PaddingSpec::parse(r),
        }
        .map_err(|e| format!("padding: {e}"))
    }
}

impl Pair {
    fn get(self) -> (usize, usize) {
        match self {
            Pair::Same(v) => (v, v),
            Pair::Each([a, b]) => (a, b),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    desc: Option<String>,
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    c_in: Option<usize>,
    #[serde(default)]
    h: Option<usize>,
    #[serde(default)]
    w: Option<usize>,
    #[serde(default)]
    c_out: Option<usize>,
    #[serde(default)]
    k_h: Option<usize>,
    #[serde(default)]
    k_w: Option<usize>,
    #[serde(default)]
    stride: Option<Pair>,
    #[serde(default)]
    padding: Option<PaddingValue>,
    #[serde(default)]
    dilation: Option<Pair>,
    #[serde(default)]
    groups: Option<usize>,
    #[serde(default)]
    bias: bool,
    #[serde(default)]
    exact: bool,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    pins: Option<String>,
    #[serde(default)]
    xfail: std::collections::BTreeMap<String, String>,
}

impl RawCase {
    /// The case's convolution and name, from its keys or its descriptor (not both).
    fn shape(&self) -> std::result::Result<(Conv2dParams, String), String> {
        let keys = [
            ("n", self.n),
            ("c_in", self.c_in),
            ("h", self.h),
            ("w", self.w),
            ("c_out", self.c_out),
            ("k_h", self.k_h),
            ("k_w", self.k_w),
        ];
        if let Some(desc) = &self.desc {
            let given = keys
                .iter()
                .filter(|(_, v)| v.is_some())
                .map(|(k, _)| *k)
                .chain(self.stride.map(|_| "stride"))
                .chain(self.padding.as_ref().map(|_| "padding"))
                .chain(self.dilation.map(|_| "dilation"))
                .chain(self.groups.map(|_| "groups"))
                .collect::<Vec<_>>();
            if !given.is_empty() {
                return Err(format!(
                    "desc {desc:?} gives the shape; {} must not be given too",
                    given.join(", ")
                ));
            }
            let problem = crate::desc::parse(desc).map_err(|e| e.to_string())?;
            let name = self
                .name
                .clone()
                .or(problem.name)
                .unwrap_or_else(|| desc.clone());
            return Ok((problem.params, name));
        }
        let name = self.name.clone().ok_or("missing field `name`")?;
        let [n, c_in, h, w, c_out, k_h, k_w] = keys.map(|(k, v)| {
            v.ok_or_else(|| format!("case {name:?}: missing field `{k}` (or give `desc`)"))
        });
        let params = Conv2dParams::new(n?, c_in?, h?, w?, c_out?, k_h?, k_w?);
        let (sh, sw) = self.stride.map_or((1, 1), Pair::get);
        let (dh, dw) = self.dilation.map_or((1, 1), Pair::get);
        let padding = match &self.padding {
            Some(v) => v.spec()?,
            None => PaddingSpec::Valid,
        };
        let params = padding.apply(
            params
                .with_stride(sh, sw)
                .with_dilation(dh, dw)
                .with_groups(self.groups.unwrap_or(1)),
        );
        Ok((params, name))
    }
}

impl<'de> Deserialize<'de> for Case {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let r = RawCase::deserialize(d)?;
        let (params, name) = r.shape().map_err(D::Error::custom)?;
        let seed = r.seed.unwrap_or_else(|| seed_of(&name));
        Ok(Case {
            name,
            params,
            bias: r.bias,
            exact: r.exact,
            seed,
            pins: r.pins,
            xfail: r.xfail,
        })
    }
}

/// A stable seed from a case's name (FNV-1a), so its data never depends on file order.
fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

impl Case {
    /// A case from a benchdnn problem descriptor alone (`sporkle-validate --problem`): named by
    /// its `n"..."` or the descriptor itself, no bias, uniform data.
    pub fn from_desc(desc: &str) -> Result<Self> {
        let problem = crate::desc::parse(desc)?;
        let name = problem.name.unwrap_or_else(|| desc.trim().to_owned());
        Ok(Case {
            seed: seed_of(&name),
            name,
            params: problem.params,
            bias: false,
            exact: false,
            pins: None,
            xfail: Default::default(),
        })
    }
}

impl Suite {
    /// Reads and checks a suite file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Suite {
            path: path.to_owned(),
            problem: format!("cannot read: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parses and checks suite text (`path` only names it in errors): names are unique and
    /// every case's parameters are valid.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let bad = |problem: String| Error::Suite {
            path: path.to_owned(),
            problem,
        };
        let suite: Suite = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let mut names = std::collections::HashSet::new();
        for c in &suite.cases {
            if !names.insert(c.name.as_str()) {
                return Err(bad(format!("case name {:?} appears twice", c.name)));
            }
            c.params
                .validate()
                .map_err(|e| bad(format!("case {:?}: {e}", c.name)))?;
        }
        Ok(suite)
    }

    /// The directory of the crate's suite files (see [`crate::repo_root`]).
    pub fn dir() -> std::path::PathBuf {
        crate::repo_root().join("suites")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_defaults_and_errors() {
        let s = Suite::parse(
            Path::new("t.toml"),
            "[[case]]\nname='a'\nn=1\nc_in=4\nh=5\nw=6\nc_out=2\nk_h=3\nk_w=1\nstride=[2,1]\npadding=1\ngroups=2\nbias=true\n",
        )
        .unwrap();
        let p = s.cases[0].params;
        assert_eq!(
            (p.stride, p.padding, p.dilation, p.groups),
            ((2, 1), (1, 1), (1, 1), 2)
        );
        assert!(s.cases[0].bias);
        let typo = Suite::parse(
            Path::new("t.toml"),
            "[[case]]\nname='a'\nn=1\nc_in=1\nh=1\nw=1\nc_out=1\nk_h=1\nk_w=1\nstrid=2\n",
        );
        assert!(typo.unwrap_err().to_string().contains("strid"));
        let dup = "[[case]]\nname='a'\nn=1\nc_in=1\nh=1\nw=1\nc_out=1\nk_h=1\nk_w=1\n";
        assert!(Suite::parse(Path::new("t.toml"), &dup.repeat(2))
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let invalid = "[[case]]\nname='z'\nn=1\nc_in=1\nh=1\nw=1\nc_out=1\nk_h=3\nk_w=1\n";
        assert!(Suite::parse(Path::new("t.toml"), invalid)
            .unwrap_err()
            .to_string()
            .contains("\"z\""));
    }

    #[test]
    fn cases_by_descriptor() {
        let s = Suite::parse(
            Path::new("t.toml"),
            "[[case]]\ndesc='mb1ic8ih9oc16kh3sh2ph1'\n[[case]]\ndesc='ic4ih5oc4kh1n\"named\"'\nbias=true\n[[case]]\nname='own'\ndesc='g2ic4ih5oc4kh3'\n",
        )
        .unwrap();
        let names: Vec<&str> = s.cases.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["mb1ic8ih9oc16kh3sh2ph1", "named", "own"]);
        assert_eq!(
            s.cases[0].params,
            Conv2dParams::new(1, 8, 9, 9, 16, 3, 3)
                .with_stride(2, 2)
                .with_padding(1, 1)
        );
        assert!(s.cases[1].bias);
        assert_eq!(s.cases[2].params.groups, 2);
        let both = Suite::parse(
            Path::new("t.toml"),
            "[[case]]\ndesc='ic4ih5oc4kh1'\nc_in=4\n",
        );
        assert!(both
            .unwrap_err()
            .to_string()
            .contains("c_in must not be given too"));
        let bad = Suite::parse(Path::new("t.toml"), "[[case]]\ndesc='ic4ih5oc4kh1zz'\n");
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("unknown field at \"zz\""));
        let pads = Suite::parse(
            Path::new("t.toml"),
            "[[case]]\nname='u'\nn=1\nc_in=1\nh=5\nw=6\nc_out=1\nk_h=2\nk_w=2\npadding=[0,1,1,0]\n[[case]]\nname='s'\nn=1\nc_in=1\nh=5\nw=6\nc_out=1\nk_h=2\nk_w=4\nstride=2\npadding='same'\n",
        )
        .unwrap();
        assert_eq!(pads.cases[0].params.pads(), [0, 1, 1, 0]);
        // SAME_UPPER: out = ceil(5/2) = 3 needs 1 row (after); ceil(6/2) = 3 needs 2 columns.
        assert_eq!(pads.cases[1].params.pads(), [0, 1, 1, 1]);
        assert_eq!(pads.cases[1].params.out_hw(), (3, 3));
        let three = Suite::parse(
            Path::new("t.toml"),
            "[[case]]\nname='t'\nn=1\nc_in=1\nh=5\nw=6\nc_out=1\nk_h=2\nk_w=2\npadding=[0,1,1]\n",
        );
        assert!(three.unwrap_err().to_string().contains("1, 2 or 4 numbers"));
        let missing = Suite::parse(Path::new("t.toml"), "[[case]]\nname='m'\nn=1\n");
        assert!(missing
            .unwrap_err()
            .to_string()
            .contains("missing field `c_in`"));
    }

    #[test]
    fn the_perf_suite_is_the_benchmark_shape_set() {
        let s = Suite::load(&Suite::dir().join("perf.toml")).unwrap();
        assert_eq!(s.cases.len(), 10);
        assert_eq!(s.cases[9].name, "vgg_3x3_56_256_n32");
        assert!((s.cases[9].params.flops() as f64 / 1e9 - 118.380).abs() < 1e-3);
    }
}
