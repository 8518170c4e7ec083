"""Golden cases from an independent producer: onnxruntime's Conv (MLAS), not sporkle.

Writes golden/cases/<name>/{x,w,b,y}.npy (float32, C order; b only where the case has a bias)
and golden/cases/manifest.json with every case's parameters and the producer's versions.
Run from the project root:  python3 golden/make_golden.py   (needs: pip install onnxruntime onnx numpy)
The data are seeded, so re-running gives the same inputs; outputs change only with the producer.
"""
import json, os, platform
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto

# name, n, c_in, h, w, c_out, k_h, k_w, stride, padding, dilation, groups, bias
# padding: (PH, PW) on both sides, (T, L, B, R) per side (ONNX pads order [t, l, b, r]), or an
# ONNX auto_pad rule ("same" = SAME_UPPER, "same-lower" = SAME_LOWER, "valid"), which ONNX
# resolves itself: the producer, not sporkle, decides what the rule means (onnxruntime refuses
# auto_pad with dilation, so dilated cases give their pads).
CASES = [
    ("resnet_3x3", 2, 16, 14, 14, 32, 3, 3, (1, 1), (1, 1), (1, 1), 1, True),
    ("stem_7x7_s2", 1, 3, 30, 30, 16, 7, 7, (2, 2), (3, 3), (1, 1), 1, True),
    ("pointwise", 2, 32, 9, 9, 40, 1, 1, (1, 1), (0, 0), (1, 1), 1, False),
    ("depthwise_3x3", 1, 24, 13, 13, 24, 3, 3, (1, 1), (1, 1), (1, 1), 24, True),
    ("grouped_dilated", 1, 16, 17, 15, 32, 3, 3, (1, 1), (2, 2), (2, 2), 4, True),
    ("per_axis", 2, 6, 19, 11, 10, 5, 3, (2, 1), (2, 0), (1, 2), 2, False),
    ("stride3_odd", 1, 5, 23, 20, 17, 4, 4, (3, 3), (1, 2), (1, 1), 1, True),
    ("wide_reduction", 1, 256, 6, 6, 16, 3, 3, (1, 1), (1, 1), (1, 1), 1, False),
    ("uneven_pads", 1, 4, 9, 8, 20, 3, 3, (1, 1), (0, 1, 2, 1), (1, 1), 1, True),
    ("same_upper_even_s2", 2, 6, 11, 10, 16, 4, 2, (2, 2), "same", (1, 1), 1, True),
    ("same_lower_s1x2", 1, 5, 12, 9, 8, 2, 3, (1, 2), "same-lower", (1, 1), 1, False),
    ("pads_dilated", 1, 5, 12, 9, 8, 2, 3, (1, 2), (2, 0, 0, 3), (2, 1), 1, False),
    ("valid_grouped", 1, 8, 10, 7, 8, 3, 2, (2, 1), "valid", (1, 1), 4, True),
]

AUTO_PAD = {"same": "SAME_UPPER", "same-lower": "SAME_LOWER", "valid": "VALID"}

def conv(x, w, b, stride, padding, dilation, groups):
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape))]
    init = [helper.make_tensor("W", TensorProto.FLOAT, list(w.shape), w.ravel())]
    names = ["X", "W"]
    if b is not None:
        init.append(helper.make_tensor("B", TensorProto.FLOAT, list(b.shape), b.ravel()))
        names.append("B")
    if isinstance(padding, str):
        pad = {"auto_pad": AUTO_PAD[padding]}
    elif len(padding) == 4:
        pad = {"pads": list(padding)}
    else:
        pad = {"pads": [padding[0], padding[1], padding[0], padding[1]]}
    node = helper.make_node("Conv", names, ["Y"], strides=list(stride), dilations=list(dilation), group=groups,
                            kernel_shape=list(w.shape[2:]), **pad)
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph([node], "conv", inputs, [y], initializer=init),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": x})[0]

def main():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cases")
    manifest = {"producer": {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
                             "python": platform.python_version(), "op": "onnx Conv opset 17, CPUExecutionProvider"},
                "cases": []}
    for i, (name, n, c, h, w, k, kh, kw, stride, padding, dilation, groups, bias) in enumerate(CASES):
        rng = np.random.default_rng(1000 + i)
        x = rng.uniform(-1, 1, (n, c, h, w)).astype(np.float32)
        wt = rng.uniform(-1, 1, (k, c // groups, kh, kw)).astype(np.float32)
        b = rng.uniform(-1, 1, (k,)).astype(np.float32) if bias else None
        y = conv(x, wt, b, stride, padding, dilation, groups).astype(np.float32)
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        for fname, arr in (("x", x), ("w", wt), ("b", b), ("y", y)):
            if arr is not None:
                np.save(os.path.join(d, fname + ".npy"), np.ascontiguousarray(arr))
        manifest["cases"].append({"name": name, "n": n, "c_in": c, "h": h, "w": w, "c_out": k, "k_h": kh, "k_w": kw,
                                  "stride": list(stride),
                                  "padding": padding if isinstance(padding, str) else list(padding),
                                  "dilation": list(dilation),
                                  "groups": groups, "bias": bias})
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(f"wrote {len(CASES)} cases to {root}")

if __name__ == "__main__":
    main()
