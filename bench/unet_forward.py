"""Benchmark: the jitted M3DDM UNet forward (one denoising call, global tokens precomputed).

Reports compile time, median step time, analytic FLOPs (matmuls and convolutions of the traced program,
m3ddm_jax.flops) and achieved TFLOP/s.

    python bench/unet_forward.py --preset tiny --batch 2 --frames 4 --size 16 --global-frames 3
    python bench/unet_forward.py --preset full --batch 4 --frames 16 --size 32 --dtype bfloat16   # GPU/TPU
    python bench/unet_forward.py --weights out/m3ddm_tiny ...                                      # converted folder
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from m3ddm_jax import pretrained  # noqa: E402
from m3ddm_jax.flops import count_flops  # noqa: E402
from m3ddm_jax.models import attention  # noqa: E402
from m3ddm_jax.models.layers import random_init  # noqa: E402
from m3ddm_jax.models.unet3d import UNet3DConfig  # noqa: E402
from report import report  # noqa: E402

PRESETS = {
    # The fixtures' tiny official config.
    "tiny": UNet3DConfig(block_out_channels=(16, 32, 32, 32), attention_heads=2, norm_num_groups=8),
    # The released M3DDM model (1.3B parameters).
    "full": UNet3DConfig(),
}


def build(args):
    overrides = {"dtype": args.dtype, "attention_impl": args.attention}
    if args.weights:
        return pretrained.load_model(os.path.join(args.weights, pretrained.UNET), **overrides)
    return random_init(pretrained.abstract_model(dataclasses.replace(PRESETS[args.preset], **overrides)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    src.add_argument("--weights", help="a converted weights folder (tools/convert_checkpoint.py)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch (windows x guidance branches)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=32, help="latent height and width")
    p.add_argument("--global-frames", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attention", default="xla", choices=attention.NAMES)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--flops-only", action="store_true",
                   help="count FLOPs on the abstract model (no parameters allocated, nothing run)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)

    if args.flops_only:
        unet = pretrained.abstract_model(dataclasses.replace(PRESETS[args.preset], dtype=args.dtype))
        cfg = unet.config
        graphdef, state = nnx.split(unet)
        spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
        tokens = jax.eval_shape(lambda m, x: m.encode_global(x, args.batch), unet,
                                spec(args.batch * args.global_frames, args.size, args.size, 4))
        flops = count_flops(lambda st, x, tok: nnx.merge(graphdef, st)(x, 501, 8.0, tok), state,
                            spec(args.batch, args.frames, args.size, args.size, cfg.in_channels), tokens)
        result = {"model": args.preset, "shape": f"B={args.batch} F={args.frames} latent={args.size}x{args.size} "
                                                 f"g={args.global_frames}", "gflops_per_step": round(flops / 1e9, 3)}
        return report(result, args.json)

    unet = build(args)
    cfg = unet.config
    graphdef, state = nnx.split(unet)
    state = jax.device_put(state)
    rng = np.random.default_rng(0)
    sample = jnp.asarray(rng.standard_normal((args.batch, args.frames, args.size, args.size, cfg.in_channels),
                                             np.float32))
    latents = jnp.asarray(rng.standard_normal((args.batch * args.global_frames, args.size, args.size, 4),
                                              np.float32))
    tokens = nnx.jit(lambda m, x: m.encode_global(x, args.batch))(unet, latents)

    def forward(state, sample, t, fps, tokens):
        return nnx.merge(graphdef, state)(sample, t, fps, tokens)

    t = jnp.full((args.batch,), 501, jnp.int32)
    fps = jnp.full((args.batch,), 8.0)
    t0 = time.perf_counter()
    compiled = jax.jit(forward).lower(state, sample, t, fps, tokens).compile()
    compile_s = time.perf_counter() - t0
    compiled(state, sample, t, fps, tokens).block_until_ready()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        compiled(state, sample, t, fps, tokens).block_until_ready()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    flops = count_flops(forward, state, sample, t, fps, tokens)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(unet, nnx.Param)))
    result = {
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} x{jax.device_count()}",
        "model": args.weights or args.preset, "params": n_params, "dtype": args.dtype, "attention": args.attention,
        "shape": f"B={args.batch} F={args.frames} latent={args.size}x{args.size} g={args.global_frames}",
        "compile_s": round(compile_s, 2), "median_step_s": round(median, 5),
        "gflops_per_step": round(flops / 1e9, 3), "tflops_per_s": round(flops / median / 1e12, 4),
    }
    return report(result, args.json)


if __name__ == "__main__":
    main()
