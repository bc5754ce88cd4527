"""Where the sampler's memory traffic goes: the TPU compiler's bytes accessed and FLOPs of each kind of UNet
part (a pseudo-3D resnet block, a spatial+temporal transformer) at each level, compiled alone for one chip
at the rows one chip runs per denoising step, then weighted by how often the UNet uses it.

    TPU_SKIP_MDS_QUERY=1 python bench/aot_parts.py                   # v5e, 12 rows (4 windows x 3 branches)
    TPU_SKIP_MDS_QUERY=1 python bench/aot_parts.py --topology v6e:2x4 --rows 12 --json parts.json

Shapes only (released architecture, bfloat16, the config's attention kernel resolved for TPU); each part
compiles in about a minute. The parts' sum leaves out the down/upsamplers, conv_in/out, the embeddings and
the sampler's own arithmetic, and compiles every resnet block with equal input and output widths (those
of the up path also take the skip connection's channels): set it against the whole call's bytes per step
from tools/aot_compile.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from m3ddm_jax import aot, pretrained  # noqa: E402
from m3ddm_jax.models.attention import resolve_attention  # noqa: E402
from m3ddm_jax.models.unet3d import ResnetBlockP3D, SpatialTemporalTransformer, UNet3DConfig  # noqa: E402


def uses(config: UNet3DConfig) -> dict[tuple[str, int], int]:
    """How many resnet blocks and transformers of each level (0: full latent resolution) one UNet forward runs,
    counted on the model: down block i is level i, up block i level n - 1 - i, the mid block level n - 1."""
    unet = pretrained.abstract_model(config)
    last = len(config.block_out_channels) - 1
    counts: dict[tuple[str, int], int] = {}
    for path, module in nnx.iter_graph(unet):
        kind = ("resnet" if isinstance(module, ResnetBlockP3D)
                else "transformer" if isinstance(module, SpatialTemporalTransformer) else None)
        if kind is None:
            continue
        level = {"down_blocks": lambda: path[1], "up_blocks": lambda: last - path[1]}.get(path[0], lambda: last)()
        counts[(kind, level)] = counts.get((kind, level), 0) + 1
    return counts


def compile_part(kind: str, level: int, config: UNet3DConfig, rows: int, frames: int, latent: int, tokens: int,
                 device) -> dict:
    channels = config.block_out_channels[level]
    side = latent // 2**level
    make = (lambda: ResnetBlockP3D(channels, channels, config, rngs=nnx.Rngs(0))) if kind == "resnet" else \
        (lambda: SpatialTemporalTransformer(channels, config, rngs=nnx.Rngs(0)))
    part = nnx.eval_shape(make)
    graphdef, state = nnx.split(part)
    sharding = NamedSharding(Mesh(np.asarray([device]), ("x",)), PartitionSpec())
    spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    state = jax.tree.map(lambda x: spec(x.shape, x.dtype), state)
    x = spec((rows, frames, side, side, channels))
    if kind == "resnet":
        temb = spec((rows, 4 * config.block_out_channels[0]))
        fn, args = (lambda s, x, t: nnx.merge(graphdef, s)(x, t, t)), (state, x, temb)
    else:
        context = spec((rows, tokens, config.cross_attention_dim))
        fn, args = (lambda s, x, c: nnx.merge(graphdef, s)(x, c)), (state, x, context)
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"kind": kind, "level": level, "channels": channels, "side": side, "compile_s": time.perf_counter() - t0,
            "bytes_accessed": float(cost.get("bytes accessed", 0.0)), "flops": float(cost.get("flops", 0.0))}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="v5e:2x4")
    p.add_argument("--rows", type=int, default=12, help="UNet rows per chip per step (windows x branches)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--tokens", type=int, default=3136, help="global tokens per row (16 frames x 14 x 14)")
    p.add_argument("--attention", default="auto")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    tpu = aot.tpu_slice(args.topology)
    config = dataclasses.replace(UNet3DConfig(), dtype="bfloat16",
                                 attention_impl=resolve_attention(args.attention, "tpu"))
    counts = uses(config)
    rows = []
    print("| part | level (channels, side) | uses per forward | GB accessed per use | GB per step | TFLOP per use "
          "(compiler) |\n|---|---|---|---|---|---|", flush=True)
    for (kind, level), n in sorted(counts.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        row = compile_part(kind, level, config, args.rows, args.frames, args.latent, args.tokens, tpu.devices[0])
        row["uses"] = n
        rows.append(row)
        print(f"| {kind} | {level} ({row['channels']}, {row['side']}x{row['side']}) | {n} | "
              f"{row['bytes_accessed'] / 1e9:.2f} | {n * row['bytes_accessed'] / 1e9:.1f} | {row['flops'] / 1e12:.2f} |",
              flush=True)
    total = sum(r["uses"] * r["bytes_accessed"] for r in rows)
    print(f"\nparts' sum: {total / 1e9:.1f} GB accessed per step per chip ({args.rows} rows)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"topology": args.topology, "rows": args.rows, "attention": config.attention_impl,
                       "parts": rows, "total_bytes": total}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
