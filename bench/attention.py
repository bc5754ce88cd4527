"""Benchmark: one jitted attention call per kernel at the full-size UNet's shapes (m3ddm_jax.models.attention).

For every case and kernel: compile time, XLA's planned temporaries (compiled.memory_analysis()), the median
of `--iters` timed calls, and the max abs difference from `xla`. Kernels alternate within each repeat, so
load from other processes falls on all of them alike. `--compile-only` reports memory without running
(shapes whose `xla` scores would not fit in RAM).

The cases, per sample row (a 16-frame window of one guidance branch) at 32x32 latents, 8 heads:
spatial self-attention (16 frames of 32x32 tokens), cross-attention (16 x 32x32 queries over the 16 x 14x14
global tokens), temporal attention (16 frames at each of 32x32 pixels); `_l1` / `_l2`: the same at the 16x16
and 8x8 levels (head_dim 80 and 160).

    python bench/attention.py --rows 1 --iters 5
    python bench/attention.py --rows 8 --compile-only
    python bench/attention.py --cases cross spatial --kernels chunked:8M chunked:32M chunked:128M:1024
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from m3ddm_jax.models import attention  # noqa: E402
from report import report  # noqa: E402

FRAMES, GLOBAL_TOKENS, HEADS = 16, 16 * 14 * 14, 8
# name: (side of the latent level, head_dim); per-row (batch, queries, keys) follow from the kind.
LEVELS = {"": (32, 40), "_l1": (16, 80), "_l2": (8, 160)}


def cases(rows: int) -> dict[str, tuple[int, int, int, int]]:
    """name -> (batch, queries, keys, head_dim) for `rows` sample rows."""
    out = {}
    for suffix, (side, d) in LEVELS.items():
        tokens = side * side
        out["spatial" + suffix] = (rows * FRAMES, tokens, tokens, d)
        out["cross" + suffix] = (rows, FRAMES * tokens, GLOBAL_TOKENS, d)
        out["temporal" + suffix] = (rows * tokens, FRAMES, FRAMES, d)
    return out


def parse_size(text: str) -> int:
    """'32M' -> 33554432 (K, M, G: powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def kernel(spec: str):
    """'NAME' (a registry kernel) or 'chunked:BYTES[:KV_BLOCK]' (chunked with those block settings)."""
    name, *params = spec.split(":")
    if name == "chunked" and params:
        kw = {"block_bytes": parse_size(params[0])}
        if len(params) > 1:
            kw["kv_block"] = int(params[1])
        return functools.partial(attention.chunked_attention, **kw)
    return attention.KERNELS[attention.check_attention_impl(name)].fn


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1, help="sample rows (windows x guidance branches)")
    p.add_argument("--cases", nargs="+", help="case names (default: all)")
    p.add_argument("--kernels", nargs="+", default=["xla", "chunked"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)

    dtype = jnp.dtype(args.dtype)
    all_cases = cases(args.rows)
    results = {}
    for name in args.cases or all_cases:
        b, tq, tk, d = all_cases[name]
        shapes = [(b, tq, HEADS, d), (b, tk, HEADS, d), (b, tk, HEADS, d)]
        compiled, row = {}, {}
        for spec in args.kernels:
            t0 = time.perf_counter()
            compiled[spec] = jax.jit(kernel(spec)).lower(*(jax.ShapeDtypeStruct(s, dtype) for s in shapes)).compile()
            row[spec] = {"compile_s": round(time.perf_counter() - t0, 2),
                         "temp_mib": round(compiled[spec].memory_analysis().temp_size_in_bytes / 2 ** 20, 1)}
        if not args.compile_only:
            rng = np.random.default_rng(0)
            inputs = [jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in shapes]
            outputs = {spec: fn(*inputs).block_until_ready() for spec, fn in compiled.items()}  # warm-up
            times = {spec: [] for spec in compiled}
            for _ in range(args.iters):
                for spec, fn in compiled.items():
                    t0 = time.perf_counter()
                    fn(*inputs).block_until_ready()
                    times[spec].append(time.perf_counter() - t0)
            for spec in compiled:
                row[spec]["median_s"] = round(statistics.median(times[spec]), 4)
                if "xla" in outputs:
                    diff = jnp.abs(outputs[spec].astype(jnp.float32) - outputs["xla"].astype(jnp.float32)).max()
                    row[spec]["max_abs_diff_vs_xla"] = float(diff)
            del inputs, outputs
        results[f"{name} (B={b}, Tq={tq}, Tk={tk}, heads={HEADS}, d={d})"] = row
    return report({"device": f"{jax.devices()[0].platform}:{platform.processor() or platform.machine()} "
                             f"x{os.cpu_count()} cpus", "dtype": args.dtype, "rows": args.rows,
                   "iters": args.iters, "results": results}, args.json)


if __name__ == "__main__":
    main()
