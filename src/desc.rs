//! Problem descriptors in oneDNN benchdnn's form, a second way to name convolution cases, so
//! shape lists written for other projects run as sporkle suites:
//! `g1mb32ic64ih56iw56oc64oh56ow56kh3kw3sh1sw1ph1pw1dh0dw0n"resnet:l1"` (underscores between
//! fields are ignored).
//!
//! benchdnn's rules, as sporkle applies them:
//! - defaults: `g1`, `mb2`, stride 1, dilation 0 (benchdnn counts the gaps between taps:
//!   its `dh0` is sporkle's `dilation = 1`), padding 0 when no output size is given;
//! - an axis with nothing given takes the other axis's values (`ih56kh3` is 56×56, 3×3);
//! - an output size without padding deduces the padding before, `((o-1)·s − i + (k−1)·(d+1) + 1) / 2`
//!   (truncated), and the padding after as what the output still needs (more than before for
//!   an odd total: TensorFlow's `SAME`);
//! - an output size with padding deduces the padding after; they must not contradict.
//!
//! Refused, each with what is wrong: 3-D fields (`id`, `od`, `kd`, `sd`, `pd`, `dd`), unknown or
//! repeated fields, an output that would need negative padding, contradictions, and sizes that
//! do not fit.

#![forbid(unsafe_code)]

use crate::error::{Error, Result};
use crate::params::Conv2dParams;

/// A parsed descriptor: the convolution and the name it gives itself (`n...`), if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The convolution.
    pub params: Conv2dParams,
    /// The name after `n` (quotes removed).
    pub name: Option<String>,
}

/// The fields a descriptor may set, in canonical order.
const FIELDS: [&str; 22] = [
    "g", "mb", "ic", "id", "ih", "iw", "oc", "od", "oh", "ow", "kd", "kh", "kw", "sd", "sh", "sw",
    "pd", "ph", "pw", "dd", "dh", "dw",
];

/// One spatial axis as given: input, output, kernel, stride, padding, dilation (benchdnn's).
#[derive(Clone, Copy, Debug, Default)]
struct Axis {
    i: Option<usize>,
    o: Option<usize>,
    k: Option<usize>,
    s: Option<usize>,
    p: Option<usize>,
    d: Option<usize>,
}

impl Axis {
    fn given(&self) -> bool {
        [self.i, self.o, self.k, self.s, self.p, self.d]
            .iter()
            .any(Option::is_some)
    }

    /// Sporkle's (input, kernel, stride, padding, dilation) for this axis named `h` or `w`.
    fn resolve(self, axis: char) -> std::result::Result<[usize; 6], String> {
        let i = self.i.ok_or(format!("no input size (i{axis})"))?;
        let k = self.k.ok_or(format!("no kernel size (k{axis})"))?;
        let s = self.s.unwrap_or(1);
        if s == 0 || i == 0 || k == 0 {
            return Err(format!("i{axis}, k{axis} and s{axis} must be positive"));
        }
        let d = self.d.unwrap_or(0);
        let span = (k - 1)
            .checked_mul(d + 1)
            .and_then(|x| x.checked_add(1))
            .ok_or(format!("k{axis}{k} with d{axis}{d} overflows"))?;
        let out =
            |before: usize, after: usize| (i + before + after).checked_sub(span).map(|x| x / s + 1);
        // benchdnn's right padding for an output `o` and left padding `left`: what the last
        // window needs past the input (negative: trailing input rows no window reads, which is
        // padding 0 here). Symmetric padding is kept where it gives the same output.
        let right_for = |o: usize, left: i128| -> usize {
            let right = (o as i128 - 1) * s as i128 + span as i128 - i as i128 - left;
            match left {
                l if l >= 0 && out(l as usize, l as usize) == Some(o) => l as usize,
                _ => right.max(0) as usize,
            }
        };
        let (before, after) = match (self.o, self.p) {
            (None, p) => (p.unwrap_or(0), p.unwrap_or(0)),
            (Some(0), _) => return Err(format!("o{axis} must be positive")),
            (Some(o), Some(p)) => (p, right_for(o, p as i128)),
            (Some(o), None) => {
                // benchdnn's left padding: half the total, truncated.
                let total = ((o - 1) as i128 * s as i128 + span as i128) - i as i128;
                let left = total / 2;
                if left < 0 {
                    return Err(format!(
                        "o{axis}{o} would need negative padding (part of the input cut off)"
                    ));
                }
                (left as usize, right_for(o, left))
            }
        };
        if let Some(o) = self.o {
            if out(before, after) != Some(o) {
                return Err(format!(
                    "o{axis}{o} contradicts the rest: i{axis}{i} k{axis}{k} s{axis}{s} \
                     p{axis}{before} d{axis}{d} give {}",
                    out(before, after).map_or("no output".into(), |v| format!("o{axis}{v}"))
                ));
            }
        }
        if out(before, after).is_none_or(|o| o == 0) {
            return Err(format!("the output along {axis} is empty"));
        }
        Ok([i, k, s, before, after, d + 1])
    }
}

/// Parses a benchdnn convolution descriptor (see the module docs).
pub fn parse(desc: &str) -> Result<Problem> {
    parse_inner(desc).map_err(|problem| Error::Descriptor {
        desc: desc.to_owned(),
        problem,
    })
}

fn parse_inner(desc: &str) -> std::result::Result<Problem, String> {
    let mut values: [Option<usize>; FIELDS.len()] = [None; FIELDS.len()];
    let mut name = None;
    let mut rest = desc.trim();
    if rest.is_empty() {
        return Err("empty descriptor".into());
    }
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('_') {
            rest = r;
            continue;
        }
        if let Some(n) = rest.strip_prefix('n') {
            let n = n.trim_matches('"');
            if n.is_empty() {
                return Err("n (the name) is empty".into());
            }
            name = Some(n.to_owned());
            break;
        }
        let field = FIELDS
            .iter()
            .position(|f| rest.starts_with(f))
            .ok_or_else(|| {
                format!("unknown field at {rest:?} (expected one of {FIELDS:?} or n)")
            })?;
        rest = &rest[FIELDS[field].len()..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let number = rest[..digits]
            .parse::<usize>()
            .map_err(|_| format!("{} needs a number (digits, within range)", FIELDS[field]))?;
        rest = &rest[digits..];
        if values[field].replace(number).is_some() {
            return Err(format!("{} is given twice", FIELDS[field]));
        }
    }
    let get = |f: &str| values[FIELDS.iter().position(|x| *x == f).expect("a field")];
    if let Some(f) = ["id", "od", "kd", "sd", "pd", "dd"]
        .iter()
        .find(|f| get(f).is_some())
    {
        return Err(format!(
            "{f} makes it a 3-D convolution; sporkle runs 2-D ones"
        ));
    }
    let axis = |a: char| Axis {
        i: get(&format!("i{a}")),
        o: get(&format!("o{a}")),
        k: get(&format!("k{a}")),
        s: get(&format!("s{a}")),
        p: get(&format!("p{a}")),
        d: get(&format!("d{a}")),
    };
    let (mut h, mut w) = (axis('h'), axis('w'));
    match (h.given(), w.given()) {
        (false, false) => return Err("no spatial sizes (ih and kh at least)".into()),
        (true, false) => w = h,
        (false, true) => h = w,
        (true, true) => {}
    }
    let [ih, kh, sh, pt, pb, dh] = h.resolve('h')?;
    let [iw, kw, sw, pl, pr, dw] = w.resolve('w')?;
    let positive = |f: &str, default: usize| match get(f) {
        Some(0) => Err(format!("{f} must be positive")),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    let c_in = get("ic").ok_or("no input channels (ic)")?;
    let c_out = get("oc").ok_or("no output channels (oc)")?;
    let params = Conv2dParams {
        n: positive("mb", 2)?,
        c_in,
        h: ih,
        w: iw,
        c_out,
        k_h: kh,
        k_w: kw,
        stride: (sh, sw),
        padding: (pt, pl),
        padding_end: (pb, pr),
        dilation: (dh, dw),
        groups: positive("g", 1)?,
    };
    params.validate().map_err(|e| e.to_string())?;
    Ok(Problem { params, name })
}

/// The canonical descriptor of `p` (every field written, benchdnn's dilation), which
/// [`parse`] reads back to `p`.
pub fn canonical(p: &Conv2dParams) -> String {
    let (ho, wo) = p.out_hw();
    format!(
        "g{}mb{}_ic{}ih{}iw{}_oc{}oh{}ow{}_kh{}kw{}_sh{}sw{}_ph{}pw{}_dh{}dw{}",
        p.groups,
        p.n,
        p.c_in,
        p.h,
        p.w,
        p.c_out,
        ho,
        wo,
        p.k_h,
        p.k_w,
        p.stride.0,
        p.stride.1,
        p.padding.0,
        p.padding.1,
        p.dilation.0 - 1,
        p.dilation.1 - 1
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(desc: &str) -> Conv2dParams {
        parse(desc).unwrap_or_else(|e| panic!("{desc}: {e}")).params
    }

    fn refused(desc: &str) -> String {
        match parse(desc) {
            Ok(p) => panic!("{desc} should be refused, gave {:?}", p.params),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_squares_and_names() {
        let p = params("mb32ic64ih56oc64kh3ph1");
        assert_eq!(
            p,
            Conv2dParams::new(32, 64, 56, 56, 64, 3, 3).with_padding(1, 1)
        );
        let p = params("ic3ih224oc64kh7sh2ph3");
        assert_eq!(
            (p.n, p.groups, p.stride, p.dilation),
            (2, 1, (2, 2), (1, 1))
        );
        assert_eq!(p.out_hw(), (112, 112));
        let named =
            parse("g1mb1_ic3ih227iw227_oc96oh55ow55_kh11kw11_sh4sw4ph0pw0_n\"alexnet:conv1\"")
                .unwrap();
        assert_eq!(named.name.as_deref(), Some("alexnet:conv1"));
        assert_eq!(named.params.out_hw(), (55, 55));
        // benchdnn's dilation counts gaps.
        assert_eq!(params("ic8ih20oc8kh3dh1").dilation, (2, 2));
        // Only w given: h takes it.
        assert_eq!(params("ic4iw9oc4kw3").h, 9);
        // Groups, and per-axis values.
        let p = params("g32mb1ic32ih14iw10oc32kh3kw1ph1pw0");
        assert_eq!((p.groups, p.w, p.k_w, p.padding), (32, 10, 1, (1, 0)));
    }

    #[test]
    fn padding_is_deduced_from_the_output() {
        // SAME at stride 1: symmetric.
        assert_eq!(params("ic16ih28oc16oh28kh5").padding, (2, 2));
        // A large output: large symmetric padding.
        assert_eq!(params("ic3ih8oc4oh40kh3").padding, (17, 17));
        // Output and padding that agree.
        assert_eq!(params("ic128ih56oc128oh28kh3sh2ph1").padding, (1, 1));
        // The last input row unused (benchdnn's right padding is -1): padding 0.
        assert_eq!(params("ic3ih8oc4oh3kh3sh2").pads(), [0, 0, 0, 0]);
        // Uneven, as benchdnn deduces it: SAME with an even kernel pads one more after.
        assert_eq!(params("ic3ih8oc4oh8kh2").pads(), [0, 0, 1, 1]);
        // The stride-2 layer written with its output only: ph0 and one row after (TF's SAME).
        let p = params("ic128ih56oc128oh28kh3sh2");
        assert_eq!((p.pads(), p.out_hw()), ([0, 0, 1, 1], (28, 28)));
        // Output and left padding given: the right side follows.
        assert_eq!(
            params("ic3ih8iw8oc4oh8ow8kh2kw2ph1pw0").pads(),
            [1, 0, 0, 1]
        );
    }

    #[test]
    fn canonical_reads_back() {
        for p in [
            Conv2dParams::new(1, 3, 224, 224, 64, 7, 7)
                .with_stride(2, 2)
                .with_padding(3, 3),
            Conv2dParams::new(4, 8, 17, 9, 16, 3, 2)
                .with_stride(2, 1)
                .with_padding(1, 0)
                .with_dilation(2, 1)
                .with_groups(4),
            Conv2dParams::new(1, 2, 8, 7, 2, 2, 4).with_pads(0, 1, 1, 2),
        ] {
            assert_eq!(params(&canonical(&p)), p, "{}", canonical(&p));
        }
    }

    #[test]
    fn bad_descriptors_say_what_is_wrong() {
        assert!(refused("").contains("empty"));
        assert!(refused("mb2ic3ih8oc4kh3xx1").contains("unknown field at \"xx1\""));
        assert!(refused("ic3ic4ih8oc4kh3").contains("ic is given twice"));
        assert!(refused("ic3id8ih8oc4kd3kh3").contains("3-D"));
        assert!(refused("ic3ih8oc4kh3oh5ph1").contains("contradicts"));
        assert!(refused("ic3ih8oc4").contains("kernel size (kh)"));
        assert!(refused("ih8oc4kh3").contains("ic"));
        assert!(refused("ic3ih8oc4kh9").contains("empty"));
        assert!(refused("ic3ih8oc4kh3sh0").contains("positive"));
        assert!(refused("mb0ic3ih8oc4kh3").contains("mb must be positive"));
        assert!(refused("g2ic3ih8oc4kh3").contains("invalid convolution parameters"));
        assert!(refused("ic3ih10oc4oh3kh3sh2").contains("negative padding"));
        assert!(refused("ic3ih8oc4oh1kh3").contains("negative padding"));
        assert!(refused("ic3ih8oc4kh3mb").contains("mb needs a number"));
        assert!(refused("ic3ih8oc4kh3n").contains("name"));
    }
}
