"""diffusers AutoencoderKL state dicts -> Flax `AutoencoderKL`."""

from __future__ import annotations

import json
import os
import re
from typing import Mapping

from flax import nnx

from m3ddm_jax.convert.mapping import flax_state_from_torch
from m3ddm_jax.convert.sources import as_source, find_weights, open_state_dict
from m3ddm_jax.models.vae import AutoencoderKL, VAEConfig

# The shared Attention keeps its output projection as `to_out`; diffusers wraps it in a ModuleList.
RENAMES = ((r"\.to_out\.", ".to_out.0."),)

# diffusers < 0.14 (and SD-1.x VAE files saved by it) named the mid-block attention projections
# query/key/value/proj_attn; today's diffusers renames them on load, and so do we.
_LEGACY_ATTENTION = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_MODERN_PROJECTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def modern_attention_name(name: str) -> str:
    """Legacy mid-block attention key -> the diffusers >= 0.14 key; other keys unchanged."""
    m = _LEGACY_ATTENTION.match(name)
    return f"{m[1]}{_MODERN_PROJECTION[m[2]]}.{m[3]}" if m else name


def vae_from_torch(source: Mapping, config: VAEConfig) -> AutoencoderKL:
    """Builds the Flax VAE from a diffusers AutoencoderKL state dict (either attention naming).

    `source` is a `TensorSource` or any mapping key -> array; tensors are read one at a time. A key set
    or shape that does not fit `config` raises `CheckpointMismatchError` listing every problem.
    """
    source = as_source(source)
    original = {}  # modern key -> key in `source`
    for name in source.shapes:
        modern = modern_attention_name(name)
        if modern in original:
            raise ValueError(f"VAE checkpoint holds both {original[modern]!r} and {name!r}, two names of the same "
                             f"tensor; keep one naming")
        original[modern] = name
    abstract = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))
    state = flax_state_from_torch(abstract, source.renamed(original), what=f"AutoencoderKL {source.path}".rstrip(),
                                  renames=RENAMES)
    return nnx.merge(nnx.graphdef(abstract), state)


def load_vae_folder(folder: str, **overrides) -> tuple[VAEConfig, AutoencoderKL]:
    """A diffusers `vae/` folder (config.json + diffusion_pytorch_model.{safetensors,bin}) -> (config, model).

    `overrides` replace config fields, e.g. dtype="bfloat16".
    """
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder}: no config.json; expected a diffusers AutoencoderKL folder (vae/)")
    with open(config_path) as f:
        config = VAEConfig.from_diffusers(json.load(f), **overrides)
    return config, vae_from_torch(open_state_dict(find_weights(folder)), config)
