"""The authors' released M3DDM checkpoint (official PyTorch names) -> Flax UNet3D."""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from flax import nnx

from m3ddm_jax.convert import mapping
from m3ddm_jax.convert.sources import as_source, find_weights, open_state_dict
from m3ddm_jax.models.layers import make_rngs
from m3ddm_jax.models.unet3d import UNet3D, UNet3DConfig

# Where the Flax tree is flatter than the PyTorch one (Sequential wrappers around a single Linear).
UNET_RENAMES = (
    (r"\.to_out\.", ".to_out.0."),
    (r"\.ff\.proj\.", ".ff.net.0.proj."),
    (r"\.ff\.out\.", ".ff.net.2."),
)


def abstract_unet(config: UNet3DConfig) -> UNet3D:
    """The model with shapes only (no parameter memory): for planning and checking conversions."""
    return nnx.eval_shape(lambda: UNet3D(config, rngs=make_rngs(0)))


def check_unet_shapes(config: UNet3DConfig, torch_shapes: Mapping[str, Sequence[int]]) -> mapping.Plan:
    """Matches a PyTorch key -> shape table against the model without allocating it."""
    return mapping.plan(nnx.to_flat_state(nnx.state(abstract_unet(config))), torch_shapes, what="M3DDM UNet",
                        renames=UNET_RENAMES)


def unet_from_torch(source: Mapping, config: UNet3DConfig) -> UNet3D:
    """Builds the Flax UNet from an official state dict (a TensorSource or any name -> array mapping)."""
    model = abstract_unet(config)
    graphdef, _ = nnx.split(model)
    state = mapping.flax_state_from_torch(model, as_source(source), what="M3DDM UNet",
                                          renames=UNET_RENAMES)
    return nnx.merge(graphdef, state)


def read_official_config(path: str, **overrides) -> UNet3DConfig:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no UNet config.json here; the released checkpoint folder holds config.json "
                                f"next to diffusion_pytorch_model.bin")
    with open(path) as f:
        return UNet3DConfig.from_diffusers(json.load(f), **overrides)


def load_official(src: str, config_path: str | None = None, **overrides) -> UNet3D:
    """Loads the released checkpoint: `src` is its folder (config.json + diffusion_pytorch_model.{safetensors,bin})
    or a weights file, with `config_path` naming its config.json when it is not beside the file."""
    weights = find_weights(src) if os.path.isdir(src) else src
    config_path = config_path or os.path.join(os.path.dirname(weights), "config.json")
    return unet_from_torch(open_state_dict(weights), read_official_config(config_path, **overrides))
