#!/usr/bin/env python3
"""Interleaved A/B rounds of sporkle's CPU backend against onnxruntime, the issue-17 table.

Usage: SPKS="[KEY=VAL@]binary,..." python3 tools/ab.py ROUNDS SECONDS [SHAPE ...]

Each round runs, shape by shape, every sporkle binary in SPKS (`sporkle bench --device cpu`)
and then the onnxruntime peer (`ort_conv.py`), so that all columns meet the same machine noise.
The table gives each column's median GFLOP/s per shape, its ratio to the peer's median, and the
geometric mean of the ratios. `KEY=VAL@` before a binary sets an environment variable for it
(for example `SPORKLE_CPU_PLANES=shared@target/release/sporkle`).
Environment: SPKS (default target/release/sporkle), THREADS (default 2), ORT_DIR (the folder
holding ort_conv.py and shapes.py; default ../shared/peers).
"""
import json, math, os, statistics, subprocess, sys


def run_json(cmd, env=None):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return {d["shape"]: d["gflops"] for d in (json.loads(l) for l in out.splitlines() if l.startswith("{"))}


def main():
    rounds, secs = int(sys.argv[1]), sys.argv[2]
    shapes = sys.argv[3:]
    threads = os.environ.get("THREADS", "2")
    ort_dir = os.environ.get("ORT_DIR", "../shared/peers")
    cols = []
    for spec in os.environ.get("SPKS", "target/release/sporkle").split(","):
        env = dict(os.environ)
        if "@" in spec:
            kv, spec = spec.split("@", 1)
            k, v = kv.split("=", 1)
            env[k] = v
        cols.append((spec, env))
    results = [dict() for _ in cols]
    peer = {}
    for r in range(rounds):
        for i, (binary, env) in enumerate(cols):
            cmd = [binary, "bench", "--device", "cpu", "--threads", threads, "--seconds", secs] + shapes
            for s, g in run_json(cmd, env).items():
                results[i].setdefault(s, []).append(g)
        cmd = ["python3", os.path.join(ort_dir, "ort_conv.py"), "--threads", threads, "--seconds", secs] + shapes
        for s, g in run_json(cmd).items():
            peer.setdefault(s, []).append(g)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    names = list(peer)
    head = "".join(f" | col{i + 1} GF  ratio" for i in range(len(cols)))
    print(f"{'shape':24} | ort GF{head}")
    logs = [[] for _ in cols]
    for s in names:
        p = statistics.median(peer[s])
        row = f"{s:24} | {p:6.1f}"
        for i in range(len(cols)):
            g = statistics.median(results[i][s])
            logs[i].append(math.log(g / p))
            row += f" | {g:7.1f} {g / p:6.3f}"
        print(row)
    print(f"{'geomean':24} |       " + "".join(f" |         {math.exp(sum(l) / len(l)):6.3f}" for l in logs))
    for i, (binary, _) in enumerate(cols):
        print(f"col{i + 1}: {binary}")


if __name__ == "__main__":
    main()
