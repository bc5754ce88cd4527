"""Would computing the cross-attention keys and values of a video's global tokens once per video pay?

The sampler encodes a video's global frames into tokens once (DESIGN §6); every cross-attention layer then
projects those tokens to keys and values in every UNet call, i.e. again at every step of every window and
guidance branch. Caching the projections per video would skip that work but hold the keys and values of all
cross-attention layers for the whole video. This script puts numbers on both sides for a UNet config at the
sampler's shapes, from the traced program (m3ddm_jax.flops; shapes only, nothing is compiled or run):

    python bench/global_kv.py                       # the released architecture, one row of 16 x 32 x 32
    python bench/global_kv.py --weights weights/m3ddm --frames 16 --latent 32 --global-frames 16
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from m3ddm_jax import pretrained  # noqa: E402
from m3ddm_jax.flops import count_flops  # noqa: E402
from m3ddm_jax.models.unet3d import UNet3DConfig  # noqa: E402


def cross_attention_layers(unet) -> list:
    """The Attention modules that attend to the global tokens: the spatial transformer blocks' attn2 (the
    temporal blocks' attn2, in transformer_blocks2, is self-attention)."""
    return [module for path, module in nnx.iter_graph(unet)
            if path and path[-1] == "attn2" and "transformer_blocks" in path]


def measure(config: UNet3DConfig, frames: int, latent: int, global_frames: int) -> dict:
    unet = pretrained.abstract_model(config)
    f32 = jnp.float32
    global_latents = jax.ShapeDtypeStruct((global_frames, latent, latent, config.out_channels), f32)
    graphdef, state = nnx.split(unet)
    tokens = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode_global(x, 1), state, global_latents).shape[1]
    sample = jax.ShapeDtypeStruct((1, frames, latent, latent, config.in_channels), f32)
    context = jax.ShapeDtypeStruct((1, tokens, config.cross_attention_dim), f32)
    scalar = jax.ShapeDtypeStruct((1,), f32)
    forward = count_flops(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, t, c), state, sample, scalar, context)
    layers = cross_attention_layers(unet)
    kv_flops = sum(2 * 2 * tokens * a.to_k.in_features * a.to_k.out_features for a in layers)
    kv_bytes = sum(2 * tokens * a.to_k.out_features * jnp.dtype(config.compute_dtype).itemsize for a in layers)
    return {"layers": len(layers), "tokens": tokens, "forward_gflop_per_row": forward / 1e9,
            "kv_gflop_per_row": kv_flops / 1e9, "kv_share": kv_flops / forward,
            "kv_cache_mib_per_row": kv_bytes / 2**20}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="a weights folder (its unet/config.json); default: the released architecture")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--latent", type=int, default=32, help="latent side (256 px / 8)")
    p.add_argument("--global-frames", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (what a cache would hold)")
    args = p.parse_args(argv)
    config = (pretrained.read_config(os.path.join(args.weights, pretrained.UNET)) if args.weights
              else UNet3DConfig())
    config = dataclasses.replace(config, dtype=args.dtype)
    result = measure(config, args.frames, args.latent, args.global_frames)
    for key, value in result.items():
        print(f"{key:24s} {value:.4g}" if isinstance(value, float) else f"{key:24s} {value}")
    return result


if __name__ == "__main__":
    main()
