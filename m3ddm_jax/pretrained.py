"""Converted weights on disk, loaded with one call.

A weights folder (written by tools/convert_checkpoint.py) holds one sub-folder per model:

    unet/config.json, unet/flax_params.safetensors        UNet3D (our config fields)
    vae/config.json,  vae/flax_params.safetensors         AutoencoderKL
    scheduler/scheduler_config.json                       diffusers-style noise schedule

Parameters are stored float32 under their Flax paths ('down_blocks.0.resnets.1.norm1.scale'), so loading
is a name-for-name copy into an abstract model: no PyTorch, no layout changes, no second copy in memory.
A damaged file of a folder (truncated, overwritten) is a sources.CheckpointReadError naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from flax import nnx

from m3ddm_jax import fileio
from m3ddm_jax.convert.mapping import FLOAT_DTYPES, CheckpointMismatchError
from m3ddm_jax.convert.sources import damaged, open_state_dict
from m3ddm_jax.models.layers import make_rngs
from m3ddm_jax.models.pixel_space import PixelSpace, PixelSpaceConfig
from m3ddm_jax.models.unet3d import UNet3D, UNet3DConfig
from m3ddm_jax.models.vae import AutoencoderKL, LatentCodec, VAEConfig

UNET, VAE, SCHEDULER = "unet", "vae", "scheduler"
PARAMS_FILE, CONFIG_FILE, SCHEDULER_FILE = "flax_params.safetensors", "config.json", "scheduler_config.json"
MODEL_CLASSES = {"UNet3D": (UNet3D, UNet3DConfig), "AutoencoderKL": (AutoencoderKL, VAEConfig),
                 "PixelSpace": (PixelSpace, PixelSpaceConfig)}

# Stable Diffusion 1.5's scheduler, which the released M3DDM pipeline uses (PNDM, scaled-linear betas).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
}


@dataclasses.dataclass
class Weights:
    """Everything the outpainting pipeline needs from a converted folder."""
    unet: UNet3D
    vae: LatentCodec  # the SD VAE, or the weight-free PixelSpace of the demo
    scheduler_config: dict


WEIGHTS_ENV = "M3DDM_WEIGHTS"  # the default weights folder of the outpaint command
REQUIRED_FILES = tuple(os.path.join(sub, name) for sub, names in (
    (UNET, (CONFIG_FILE, PARAMS_FILE)),
    (VAE, (CONFIG_FILE, PARAMS_FILE)),
    (SCHEDULER, (SCHEDULER_FILE,))) for name in names)


def check_weights_folder(folder: str | None) -> str:
    """Fails fast, before any model is loaded, on a missing or incomplete weights folder."""
    convert = "convert a checkpoint or export a training run with tools/convert_checkpoint.py"
    if not folder:
        raise FileNotFoundError(f"no weights folder: pass --weights DIR or set ${WEIGHTS_ENV} ({convert})")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"weights folder {folder} does not exist; {convert}")
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"weights folder {folder} is incomplete: missing {', '.join(missing)}; "
                                f"{convert} (with --vae)")
    return folder


def _key(path) -> str:
    return ".".join(str(p) for p in path)


def abstract_model(config) -> nnx.Module:
    """A shape-only model for a UNet3DConfig or VAEConfig."""
    for cls, config_cls in MODEL_CLASSES.values():
        if isinstance(config, config_cls):
            return nnx.eval_shape(lambda: cls(config, rngs=make_rngs(0)))
    raise TypeError(f"no model class for config {type(config).__name__}")


def reconfigure(model: nnx.Module, **fields: Any) -> nnx.Module:
    """`model` with config fields that leave its parameters as they are (dtype, attention kernel, remat)
    replaced: a new module over the same arrays (`model` itself when nothing changes)."""
    config = dataclasses.replace(model.config, **fields)
    if config == model.config:
        return model
    return nnx.merge(nnx.graphdef(abstract_model(config)), nnx.state(model))


def save_model(folder: str, model: nnx.Module, config) -> None:
    """Writes config.json and flax_params.safetensors into `folder` (each file atomically)."""
    from safetensors.numpy import save_file

    name = next(n for n, (cls, _) in MODEL_CLASSES.items() if isinstance(model, cls))
    os.makedirs(folder, exist_ok=True)
    tensors = {_key(p): np.ascontiguousarray(np.asarray(v.get_value(), np.float32))
               for p, v in nnx.to_flat_state(nnx.state(model))}
    with fileio.atomic_path(os.path.join(folder, PARAMS_FILE)) as tmp:
        save_file(tensors, tmp, metadata={"format": "m3ddm_jax", "model": name})
    save_config(folder, config)


def save_config(folder: str, config) -> None:
    """Writes `folder`/config.json (atomically): what `read_config` reads."""
    name = next(n for n, (_, config_cls) in MODEL_CLASSES.items() if isinstance(config, config_cls))
    os.makedirs(folder, exist_ok=True)
    fileio.write_text(os.path.join(folder, CONFIG_FILE),
                      json.dumps({"_class_name": name, **dataclasses.asdict(config)}, indent=2))


def _require(path: str, folder: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {folder} is not a converted model folder "
                                f"(write one with tools/convert_checkpoint.py)")


def _read_json(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            value = json.load(f)
    except ValueError as err:  # JSON or UTF-8 decoding
        raise damaged(path, f"not a readable JSON file ({err})") from err
    if not isinstance(value, dict):
        raise damaged(path, f"expected a JSON object, found {type(value).__name__}")
    return value


def read_config(folder: str, **overrides: Any):
    """The model config of a folder written by `save_model` (its config.json only; no weights are read)."""
    config_path = os.path.join(folder, CONFIG_FILE)
    _require(config_path, folder)
    fields = _read_json(config_path)
    name = fields.pop("_class_name", None)
    if name not in MODEL_CLASSES:
        raise ValueError(f"{config_path}: unknown model class {name!r}; expected one of {sorted(MODEL_CLASSES)}")
    try:
        config = MODEL_CLASSES[name][1](**fields)
    except TypeError as err:  # a field the class does not have
        raise damaged(config_path, f"not a {name} config ({err})") from err
    return dataclasses.replace(config, **overrides)


def load_model(folder: str, **overrides: Any) -> nnx.Module:
    """Loads a model folder written by `save_model`. `overrides` replace config fields (e.g. dtype)."""
    params_path = os.path.join(folder, PARAMS_FILE)
    _require(params_path, folder)
    model = abstract_model(read_config(folder, **overrides))
    graphdef, abstract = nnx.split(model)
    flat = nnx.to_flat_state(abstract)
    source = open_state_dict(params_path)
    stored = source.shapes
    expected = {_key(p): tuple(v.shape) for p, v in flat}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    mismatched = [(k, stored[k], expected[k]) for k in expected if k in stored and stored[k] != expected[k]]
    not_float = sorted((k, d) for k, d in source.dtypes.items() if d not in FLOAT_DTYPES)
    if missing or unexpected or mismatched or not_float:
        raise CheckpointMismatchError(params_path, missing, unexpected, mismatched, not_float=not_float)
    leaves = [(p, v.replace(np.asarray(source[_key(p)], v.dtype))) for p, v in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def save_weights(folder: str, *, unet: UNet3D | None = None, vae: LatentCodec | None = None,
                 scheduler_config: dict | None = None, report: dict | None = None, overwrite: bool = False,
                 unet_config: UNet3DConfig | None = None) -> None:
    """Writes a complete weights folder; it appears under its name only once every file is written.
    `unet_config` instead of `unet` writes the UNet's config alone (a training run's model folder, whose
    parameters live in its checkpoints)."""
    with fileio.atomic_dir(folder, overwrite=overwrite) as tmp:
        if unet is not None:
            save_model(os.path.join(tmp, UNET), unet, unet.config)
        elif unet_config is not None:
            save_config(os.path.join(tmp, UNET), unet_config)
        if vae is not None:
            save_model(os.path.join(tmp, VAE), vae, vae.config)
        os.makedirs(os.path.join(tmp, SCHEDULER))
        fileio.write_text(os.path.join(tmp, SCHEDULER, SCHEDULER_FILE),
                          json.dumps(scheduler_config or SD15_SCHEDULER_CONFIG, indent=2))
        if report is not None:
            fileio.write_text(os.path.join(tmp, "conversion.json"), json.dumps(report, indent=2))


def load_weights(folder: str, **unet_overrides: Any) -> Weights:
    """The UNet, VAE and scheduler config of a converted folder. `unet_overrides` replace UNet config fields
    (e.g. dtype='bfloat16', attention_impl='cudnn')."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"weights folder {folder} does not exist; convert a checkpoint with "
                                f"tools/convert_checkpoint.py")
    unet = load_model(os.path.join(folder, UNET), **unet_overrides)
    vae = load_model(os.path.join(folder, VAE))
    return Weights(unet, vae, read_scheduler_config(folder))


def read_scheduler_config(folder: str, default: dict | None = None) -> dict:
    """The scheduler config of a weights folder (or of a run's model/ folder); `default` where it has none,
    else an error naming the missing file."""
    path = os.path.join(folder, SCHEDULER, SCHEDULER_FILE)
    if not os.path.isfile(path):
        if default is not None:
            return default
        raise FileNotFoundError(f"{path} is missing: {folder} is not a complete weights folder")
    return _read_json(path)
