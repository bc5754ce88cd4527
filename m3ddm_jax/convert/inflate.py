"""Stable Diffusion 1.x UNet (UNet3D in 2D mode) -> the initial M3DDM 3D UNet.

The 2D mode is the 3D model minus the layers M3DDM adds, so every SD tensor has the same Flax path in
both, and every tensor of the 3D model starts in one of five ways (`INITS`). Categories name the
structural correspondence as param_correspondence_sd15.tsv of the reference fixtures does.

Identity property (tests/test_sd.py checks it). Let `sd0` be the SD UNet with the output projection of
its cross-attention (`transformer_blocks.0.attn2.to_out`) set to zero. For a video whose F frames all
hold the same latent x, with any conditioning channels c, any fps and any global tokens,

    inflated(concat(x, c), t, fps, tokens)[:, f] == sd0(x[:, None], t, None, any_context)[:, 0]  for every f,

up to float rounding, because
- conv_in has SD's kernel on the first in_channels(SD) inputs and zero on the new ones;
- every temporal conv is the identity (kernel[1] = I, kernel[0] = kernel[2] = 0, bias 0), so each
  pseudo-3D conv is SD's 2D conv;
- every temporal transformer ends in proj_out2 = 0 (kernel and bias) and adds exactly zero. The official
  init (dirac) is not used there: behind a non-zero feed-forward it adds the block's output. A zero
  proj_out2 still receives a gradient (the block's output) at the first step, and the layers behind it
  receive theirs from the second (tests/test_sd.py checks this for proj_out2, fps_emb_proj and to_out);
- each resnet's fps projection is zero (kernel and bias), so fps adds nothing;
- cross-attention to the global tokens ends in to_out = 0 (kernel and bias) and adds nothing; its to_k
  and to_v are new (they read the global encoder's 320-d tokens where SD's read 768-d text embeddings);
- the joint-over-frames GroupNorms see F copies of one frame, whose statistics are the frame's own;
- the timestep sinusoid keeps SD's max period (10000).
Other new layers take nnx's default init (`INITS['fresh']`); proj_in2 starts at identity, as the official
dirac init.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3ddm_jax.convert import m3ddm, mapping, sd
from m3ddm_jax.models.unet3d import UNet3D, UNet3DConfig

IDENTITY_PROPERTY = ("On F identical frames, with any extra input channels, fps and global tokens, the inflated "
                     "UNet returns on every frame what the SD UNet with zeroed cross-attention output "
                     "(attn2.to_out) returns on that frame.")

INITS = {
    "copy": "the SD tensor",
    "copy_widen_inputs": "the SD kernel on the first input channels, zero on the new ones",
    "zero": "zero",
    "identity": "identity (temporal conv: kernel[1] = I, kernel[0] = kernel[2] = 0; 1x1 projection: I)",
    "fresh": "nnx's default init, drawn with the seed (kernels lecun-normal, biases 0, norm scales 1, BatchNorm "
             "mean 0 / var 1)",
}

# (pattern on the dotted Flax path, init); the first match wins. Without a match a tensor is copied from
# SD when SD has it, and fresh otherwise.
_RULES = (
    (r"(^|\.)transformer_blocks\.\d+\.attn2\.to_out\.", "zero"),
    (r"(^|\.)transformer_blocks\.\d+\.attn2\.to_[kv]\.", "fresh"),
    (r"\.(temporal_conv|proj_in2)\.kernel$", "identity"),
    (r"\.(temporal_conv|proj_in2)\.bias$", "zero"),
    (r"\.(proj_out2|fps_emb_proj)\.", "zero"),
    (r"^conv_in\.kernel$", "copy_widen_inputs"),
)
# Categories of the tensors SD does not have.
_NEW_CATEGORIES = (
    (r"\.temporal_conv\.", "new:temporal_conv1d_in_pseudo3d_conv"),
    (r"\.attentions\.\d+\.(norm2|proj_in2|temporal_position_embed_proj|transformer_blocks2|proj_out2)\.",
     "new:temporal_transformer"),
    (r"(^|\.)(fps_embedding|fps_emb_proj)\.", "new:fps_embedding"),
    (r"^global_img_encoder\.", "new:global_image_encoder"),
)
# Kernels that are Conv3d with a singleton time extent in the official model where SD has a Conv2d.
_OFFICIAL_CONV3D = re.compile(r"(samplers\.0\.conv|conv_shortcut)\.weight$")
# Fields the SD tensors depend on: the inflated model must keep them for the copies to mean the same.
_SHARED_FIELDS = ("out_channels", "block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                  "attention_heads", "norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift",
                  "timestep_max_period")
_M3DDM_LAYERS = ("temporal_layers", "fps_conditioning", "global_encoder")
GLOBAL_TOKEN_DIM = 320  # the official global encoder's last conv emits 320 channels


@dataclasses.dataclass(frozen=True)
class Entry:
    """How one tensor of the inflated model starts."""
    path: tuple  # Flax path
    m3ddm: str  # official PyTorch name
    shape: tuple  # Flax shape
    category: str  # as in param_correspondence_sd15.tsv
    init: str  # a key of INITS
    sd: str | None = None  # diffusers name of the SD tensor it starts from
    sd_shape: tuple | None = None


def inflated_config(sd_config: UNet3DConfig, **overrides) -> UNet3DConfig:
    """The M3DDM config an SD UNet inflates into: SD's architecture and timestep period, 2 * out + 1 input
    channels (noisy latent, conditioning latent, mask), 320-d global tokens, every M3DDM layer on.
    `overrides` replace fields; those SD's tensors depend on must keep SD's values (checked on inflation)."""
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(UNet3DConfig)})
    if unknown:
        raise ValueError(f"unknown UNet3DConfig fields {unknown}")
    config = dataclasses.replace(sd_config, in_channels=2 * sd_config.out_channels + 1,
                                 cross_attention_dim=GLOBAL_TOKEN_DIM, **{f: True for f in _M3DDM_LAYERS})
    return dataclasses.replace(config, **overrides)


def _check(sd_config: UNet3DConfig, config: UNet3DConfig) -> None:
    problems = [f"the source UNet has {f} on: it is not a 2D (Stable Diffusion) UNet"
                for f in _M3DDM_LAYERS if getattr(sd_config, f)]
    if sd_config.in_channels != sd_config.out_channels:
        problems.append(f"the SD UNet takes {sd_config.in_channels} input channels, not {sd_config.out_channels}: "
                        f"inflation starts from a text-to-image UNet (an inpainting UNet's extra channels mean "
                        f"something else)")
    if config.in_channels < sd_config.in_channels:
        problems.append(f"in_channels={config.in_channels} is fewer than the SD UNet's {sd_config.in_channels}")
    problems += [f"{f}={getattr(config, f)!r} but the SD UNet has {getattr(sd_config, f)!r}"
                 for f in _SHARED_FIELDS if getattr(config, f) != getattr(sd_config, f)]
    if problems:
        raise ValueError("cannot inflate: " + "; ".join(problems))


def _first(table, dotted: str):
    return next((value for pattern, value in table if re.search(pattern, dotted)), None)


def inflation_plan(sd_config: UNet3DConfig, config: UNet3DConfig) -> list[Entry]:
    """Where every tensor of the inflated model comes from, from the configs alone (abstract models)."""
    return _plan(m3ddm.abstract_unet(sd_config), m3ddm.abstract_unet(config))


def _plan(sd_unet: UNet3D, model: UNet3D) -> list[Entry]:
    _check(sd_unet.config, model.config)
    sd_flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(sd_unet))}
    entries = []
    for path, var in nnx.to_flat_state(nnx.state(model)):
        path, shape = tuple(path), tuple(var.shape)
        dotted = ".".join(map(str, path))
        name = mapping.torch_name(path, m3ddm.UNET_RENAMES)
        init = _first(_RULES, dotted)
        sd_var = sd_flat.pop(path, None)
        if sd_var is None:
            category = _first(_NEW_CATEGORIES, dotted)
            if category is None:
                raise AssertionError(f"inflation has no rule for the new tensor {dotted}")
            if isinstance(var, nnx.BatchStat):
                category += "(buffer)"
            entries.append(Entry(path, name, shape, category, init or "fresh"))
            continue
        sd_name, sd_shape = mapping.torch_name(path, sd.SD_UNET_RENAMES), tuple(sd_var.shape)
        init = init or "copy"
        if sd_shape != shape and init not in ("copy_widen_inputs", "fresh"):
            raise AssertionError(f"{dotted}: SD shape {sd_shape} but {shape} in the inflated model")
        if sd_shape != shape:
            category = "same_name_changed_shape"
        elif name != sd_name:
            category = "renamed_same_shape(spatial_conv)"
        elif _OFFICIAL_CONV3D.search(name):
            category = "same_name_conv3d_with_singleton_time_of_sd_conv2d"
        else:
            category = "same_name_same_shape"
        entries.append(Entry(path, name, shape, category, init, sd_name, sd_shape))
    if sd_flat:
        raise AssertionError(f"SD tensors without an M3DDM counterpart: {sorted(map(str, sd_flat))[:10]}")
    return entries


def _identity(shape: tuple) -> np.ndarray:
    eye = np.eye(shape[-1], dtype=np.float32)
    if len(shape) == 2:
        return eye
    out = np.zeros(shape, np.float32)
    out[shape[0] // 2] = eye
    return out


def _widen_inputs(shape: tuple, sd_value: np.ndarray) -> np.ndarray:
    out = np.zeros(shape, np.float32)
    out[..., :sd_value.shape[-2], :] = sd_value
    return out


def _fresh_values(entries: list[Entry], seed: int) -> dict[tuple, np.ndarray]:
    """The "fresh" tensors: what nnx's default initialisers give (lecun-normal kernels: normal truncated at
    +-2 sigma, std 1/sqrt(fan_in) with fan_in all axes but the last; biases and BatchNorm means 0; norm scales
    and BatchNorm variances 1). All kernels come from one draw: drawing tensor by tensor would compile a
    sampler per shape, minutes for the full model."""
    fresh = [e for e in entries if e.init == "fresh"]
    kernels = [e for e in fresh if e.path[-1] == "kernel"]
    draws = np.asarray(jax.random.truncated_normal(jax.random.key(seed), -2.0, 2.0,
                                                   (sum(math.prod(e.shape) for e in kernels),), jnp.float32))
    values, offset = {}, 0
    for e in kernels:
        n = math.prod(e.shape)
        # The std of a standard normal truncated at +-2 is 0.8796: dividing by it restores std 1/sqrt(fan_in).
        std = 1.0 / math.sqrt(math.prod(e.shape[:-1])) / 0.87962566103423978
        values[e.path] = (draws[offset:offset + n] * std).reshape(e.shape)
        offset += n
    constant = {"bias": 0.0, "mean": 0.0, "scale": 1.0, "var": 1.0}
    for e in fresh:
        if e.path[-1] != "kernel":
            values[e.path] = np.full(e.shape, constant[str(e.path[-1])], np.float32)
    return values


# The rules above that start M3DDM's temporal layers and fps conditioning as the identity: each frame goes
# through the UNet as through its 2D layers alone.
_IDENTITY_START_RULES = tuple(r for r in _RULES if "temporal_conv" in r[0] or "fps_emb_proj" in r[0])


def identity_start(unet: UNet3D) -> UNet3D:
    """Sets `unet`'s temporal convs and proj_in2 to the identity, and proj_out2 and the fps projections to
    zero, in place, as inflation starts them (the rules above); every other tensor keeps its value. For a
    UNet trained from scratch ("identity start"): it begins as a per-frame 2D UNet, and the temporal layers
    learn from there."""
    state = nnx.state(unet, nnx.Param)
    leaves = []
    for path, var in nnx.to_flat_state(state):
        init = _first(_IDENTITY_START_RULES, ".".join(map(str, path)))
        if init is not None:
            value = _identity(tuple(var.shape)) if init == "identity" else np.zeros(var.shape, np.float32)
            var = var.replace(jnp.asarray(value, var.get_value().dtype))
        leaves.append((path, var))
    nnx.update(unet, nnx.from_flat_state(leaves))
    return unet


def inflate(sd_unet: UNet3D, config: UNet3DConfig | None = None, *, seed: int = 0) -> tuple[UNet3D, list[Entry]]:
    """The initial M3DDM UNet from an SD UNet (2D mode), and the plan it followed.

    `config` defaults to `inflated_config(sd_unet.config)`; `seed` draws the fresh tensors. The model is
    filled tensor by tensor into an abstract one, never initialised at random as a whole."""
    abstract = m3ddm.abstract_unet(config or inflated_config(sd_unet.config))
    entries = _plan(sd_unet, abstract)
    fresh = _fresh_values(entries, seed)
    sd_state = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(sd_unet))}
    values = {}
    for e in entries:
        if e.init == "fresh":
            values[e.path] = fresh[e.path]
        elif e.init == "zero":
            values[e.path] = np.zeros(e.shape, np.float32)
        elif e.init == "identity":
            values[e.path] = _identity(e.shape)
        else:
            sd_value = np.asarray(sd_state[e.path].get_value())
            values[e.path] = sd_value if e.init == "copy" else _widen_inputs(e.shape, sd_value)
    leaves = [(p, v.replace(jnp.asarray(values[tuple(p)]))) for p, v in nnx.to_flat_state(nnx.state(abstract))]
    return nnx.merge(nnx.graphdef(abstract), nnx.from_flat_state(leaves)), entries


def report(entries: list[Entry], config: UNet3DConfig, seed: int) -> dict:
    """The inflation report: the property, the inits, counts per (category, init), and every tensor."""
    summary: dict[str, dict[str, int]] = {}
    for e in entries:
        row = summary.setdefault(f"{e.category} -> {e.init}", {"tensors": 0, "values": 0})
        row["tensors"] += 1
        row["values"] += math.prod(e.shape)
    return {"kind": "inflate", "seed": seed, "config": dataclasses.asdict(config), "property": IDENTITY_PROPERTY,
            "inits": INITS, "summary": summary,
            "tensors": [{"m3ddm": e.m3ddm, "shape": list(e.shape), "category": e.category, "init": e.init,
                         "sd": e.sd, "sd_shape": None if e.sd_shape is None else list(e.sd_shape)}
                        for e in entries]}
