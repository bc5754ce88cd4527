"""Stable Diffusion 1.x checkpoints -> the Flax SD UNet (UNet3D in 2D mode) and AutoencoderKL.

Two inputs:
- a diffusers folder: unet/ and vae/ (config.json + diffusion_pytorch_model.{safetensors,bin}), and
  scheduler/scheduler_config.json (SD 1.5's PNDM settings when absent); the text encoder is not needed;
- an original (CompVis LDM) single file, .ckpt or .safetensors: `model.diffusion_model.*` (UNet),
  `first_stage_model.*` (VAE), `cond_stage_model.*` (CLIP text encoder, ignored), `model_ema.*` (ignored:
  the non-EMA weights are converted, as diffusers does by default) and the DDPM schedule buffers (ignored).
  It carries no config: SD 1.5's is assumed unless one is given.

LDM names are translated by tables generated from the model config (`ldm_unet_names`, `ldm_vae_names`):
each diffusers key of the model gets exactly one LDM key, so the translation is complete and invertible,
and a key the table does not know is reported as unexpected rather than dropped.
"""

from __future__ import annotations

import json
import os
import re
from typing import Mapping

from flax import nnx

from m3ddm_jax import pretrained
from m3ddm_jax.convert import m3ddm, mapping, vae as vae_convert
from m3ddm_jax.convert.sources import TensorSource, as_source, find_weights, open_state_dict
from m3ddm_jax.models.layers import make_rngs
from m3ddm_jax.models.unet3d import CROSS_ATTN_DOWN, CROSS_ATTN_UP, PLAIN_DOWN, PLAIN_UP, UNet3D, UNet3DConfig
from m3ddm_jax.models.vae import AutoencoderKL, VAEConfig

# Our Flax UNet keeps every resnet conv and conv_out inside a Pseudo3DConv (its `spatial_conv`).
SD_UNET_RENAMES = m3ddm.UNET_RENAMES + ((r"\.spatial_conv\.", "."),)

# The 2D mode: SD's UNet is UNet3D without the layers M3DDM adds, with SD's timestep sinusoid.
SD_MODE = {"temporal_layers": False, "fps_conditioning": False, "global_encoder": False,
           "timestep_max_period": 10000.0}

_BLOCK_TYPES = {"CrossAttnDownBlock2D": CROSS_ATTN_DOWN, "DownBlock2D": PLAIN_DOWN,
                "CrossAttnUpBlock2D": CROSS_ATTN_UP, "UpBlock2D": PLAIN_UP}
# diffusers' UNet2DConditionModel defaults, for keys a config.json leaves out.
_DIFFUSERS_DEFAULTS = {
    "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2, "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280,
    "attention_head_dim": 8,
}
# Stable Diffusion 1.5's unet/config.json (what an original single file holds).
SD15_UNET_CONFIG = {**_DIFFUSERS_DEFAULTS, "_class_name": "UNet2DConditionModel", "cross_attention_dim": 768,
                    "sample_size": 64}
# Options that SD 1.x leaves at these values; any other value adds or changes layers (SD 2.x, SDXL, ...).
_SD1_VALUES = {
    "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu",
    "transformer_layers_per_block": 1, "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "num_attention_heads": None, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None,
}
# Keys that do not change the forward pass here: bookkeeping, precision hints (softmax is float32
# anyway), and the head count of an addition embedding SD 1.x does not have.
_IGNORED_KEYS = ("sample_size", "upcast_attention", "addition_embed_type_num_heads")

LDM_UNET, LDM_VAE = "model.diffusion_model.", "first_stage_model."
LDM_IGNORED = {"cond_stage_model.": "CLIP text encoder (not needed)",
               "model_ema.": "EMA copy of the UNet (the non-EMA weights are converted)"}
# Prefixes that identify other model families, for the error message.
_OTHER_FAMILIES = {"conditioner.": "SDXL", "cond_stage_model.model.": "SD 2.x (OpenCLIP text encoder)",
                   "control_model.": "a ControlNet", "global_img_encoder.": "an M3DDM UNet (use `m3ddm`)",
                   "down_blocks.": "a bare diffusers UNet state dict (convert the diffusers folder instead)"}


def sd_unet_config(d: Mapping, **overrides) -> UNet3DConfig:
    """A diffusers UNet2DConditionModel config.json dict (SD 1.x) -> the UNet3DConfig of the 2D mode.

    Raises ValueError naming every setting outside SD 1.x (SD 2.x head widths and linear projections,
    SDXL's extra embeddings, other block types, ...). Absent keys take diffusers' defaults."""
    cls = d.get("_class_name", "UNet2DConditionModel")
    problems = [] if cls == "UNet2DConditionModel" else [f"_class_name is {cls!r}, not 'UNet2DConditionModel'"]
    known = set(_DIFFUSERS_DEFAULTS) | set(_SD1_VALUES) | set(_IGNORED_KEYS)
    problems += [f"unknown key {k!r}" for k in d if not k.startswith("_") and k not in known]
    problems += [f"{k}={d[k]!r} (SD 1.x has {v!r})" for k, v in _SD1_VALUES.items() if k in d and d[k] != v]
    d = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in d.items() if k in _DIFFUSERS_DEFAULTS}}
    if not isinstance(d["attention_head_dim"], int):
        problems.append(f"attention_head_dim={d['attention_head_dim']!r} (a per-block list, as in SD 2.x; SD 1.x "
                        f"has one head count)")
    for key in ("down_block_types", "up_block_types"):
        bad = [t for t in d[key] if t not in _BLOCK_TYPES]
        if bad:
            problems.append(f"{key} has {bad} (SD 1.x uses {sorted(_BLOCK_TYPES)})")
    if problems:
        raise ValueError("not a Stable Diffusion 1.x UNet config: " + "; ".join(problems))
    d = {**d, **{key: [_BLOCK_TYPES[t] for t in d[key]] for key in ("down_block_types", "up_block_types")}}
    return UNet3DConfig.from_diffusers(d, **{**SD_MODE, **overrides})


def diffusers_unet_names(config: UNet3DConfig) -> list[str]:
    """The diffusers state-dict keys of the SD UNet with this (2D-mode) config."""
    flat = nnx.to_flat_state(nnx.state(m3ddm.abstract_unet(config)))
    return [mapping.torch_name(path, SD_UNET_RENAMES) for path, _ in flat]


def unet_from_diffusers(source: Mapping, config: UNet3DConfig, *, what: str = "SD UNet") -> UNet3D:
    """The Flax SD UNet from a diffusers UNet2DConditionModel state dict (a TensorSource or a mapping)."""
    abstract = m3ddm.abstract_unet(config)
    state = mapping.flax_state_from_torch(abstract, as_source(source), what=what,
                                          renames=SD_UNET_RENAMES)
    return nnx.merge(nnx.graphdef(abstract), state)


# --- original (LDM) names ------------------------------------------------------------------------------

_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_LDM_UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                 "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_LDM_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _ldm_unet_name(name: str, config: UNet3DConfig) -> str:
    """One diffusers UNet key -> its LDM key (without `model.diffusion_model.`).

    LDM numbers the layers of the whole down path as input_blocks (0 = conv_in, then layers_per_block
    [resnet, attention] slots per block and one slot for its downsampler) and the up path as
    output_blocks (layers_per_block + 1 slots per block, the upsampler sharing the last one)."""
    per_block = config.layers_per_block + 1

    def resnet(rest):
        layer, leaf = rest.split(".", 1)
        return f"{_LDM_RESNET[layer]}.{leaf}"

    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", name)
    if m:
        side, b, kind, i, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if kind == "downsamplers":
            return f"input_blocks.{(b + 1) * per_block}.0.op.{rest.removeprefix('conv.')}"
        if kind == "upsamplers":  # after the last resnet [and attention] of the block's last slot
            return f"output_blocks.{(b + 1) * per_block - 1}.{1 + (config.up_block_types[b] == CROSS_ATTN_UP)}.{rest}"
        slot = 1 + b * per_block + i if side == "down" else b * per_block + i
        blocks = "input_blocks" if side == "down" else "output_blocks"
        return f"{blocks}.{slot}.0.{resnet(rest)}" if kind == "resnets" else f"{blocks}.{slot}.1.{rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        return f"middle_block.{2 * int(m[2])}.{resnet(m[3])}" if m[1] == "resnets" else f"middle_block.1.{m[3]}"
    prefix, leaf = name.rsplit(".", 1)
    return f"{_LDM_UNET_TOP[prefix]}.{leaf}"


def ldm_unet_names(config: UNet3DConfig) -> dict[str, str]:
    """diffusers key -> LDM key (without `model.diffusion_model.`) for every tensor of the SD UNet."""
    return {name: _ldm_unet_name(name, config) for name in diffusers_unet_names(config)}


def _ldm_vae_name(name: str, blocks: int) -> str:
    """One diffusers AutoencoderKL key -> its LDM key (without `first_stage_model.`). The decoder's up
    blocks are numbered from the lowest resolution in diffusers and from the highest in LDM."""
    name = name.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.+)", name)
    if m:
        return f"encoder.down.{m[1]}." + (f"block.{m[3]}.{m[4]}" if m[2] == "resnets" else f"downsample.{m[4]}")
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)", name)
    if m:
        up = blocks - 1 - int(m[1])
        return f"decoder.up.{up}." + (f"block.{m[3]}.{m[4]}" if m[2] == "resnets" else f"upsample.{m[4]}")
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", name)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", name)
    if m:  # LDM's q/k/v/proj_out are 1x1 Conv2d; the layout rules turn them into the Linears
        return f"{m[1]}.mid.attn_1.{_LDM_VAE_ATTENTION[m[2]]}.{m[3]}"
    return name


def ldm_vae_names(config: VAEConfig) -> dict[str, str]:
    """diffusers key -> LDM key (without `first_stage_model.`) for every tensor of the VAE."""
    abstract = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=make_rngs(0)))
    names = [mapping.torch_name(p, vae_convert.RENAMES) for p, _ in nnx.to_flat_state(nnx.state(abstract))]
    return {n: _ldm_vae_name(n, len(config.block_out_channels)) for n in names}


def _renamed(source: TensorSource, to_ldm: Mapping[str, str]) -> TensorSource:
    """`source` (LDM keys) under diffusers keys; keys outside the table keep their name, so a mismatch
    lists them as unexpected."""
    to_diffusers = {ldm: name for name, ldm in to_ldm.items()}
    return source.renamed({to_diffusers.get(k, k): k for k in source.shapes})


def _prefix_counts(keys) -> str:
    counts: dict[str, int] = {}
    for k in keys:
        head = k.split(".")[0] + "." if "." in k else k
        counts[head] = counts.get(head, 0) + 1
    return ", ".join(f"{p}* ({n})" for p, n in sorted(counts.items(), key=lambda x: -x[1])[:8])


def split_single_file(source: TensorSource) -> tuple[TensorSource, TensorSource, dict[str, int]]:
    """An original SD 1.x state dict -> (UNet part, VAE part, ignored groups with their tensor counts).

    Raises ValueError for a file of another layout or model family, naming what it found."""
    keys = list(source.shapes)
    for prefix, family in _OTHER_FAMILIES.items():
        if any(k.startswith(prefix) for k in keys):
            raise ValueError(f"{source.path}: this is {family}, not a Stable Diffusion 1.x checkpoint (it has "
                             f"{prefix}* keys)")
    unet, vae = source.with_prefix(LDM_UNET), source.with_prefix(LDM_VAE)
    if not len(unet) and not len(vae):
        raise ValueError(f"{source.path}: unknown key layout: no {LDM_UNET}* (UNet) or {LDM_VAE}* (VAE) keys, as an "
                         f"original Stable Diffusion 1.x checkpoint has; found {_prefix_counts(keys)}. A diffusers "
                         f"model is converted from its folder (unet/, vae/).")
    for part, prefix, what in ((unet, LDM_UNET, "UNet"), (vae, LDM_VAE, "VAE")):
        if not len(part):
            raise ValueError(f"{source.path}: no {prefix}* ({what}) keys; a Stable Diffusion 1.x checkpoint holds "
                             f"both the UNet ({LDM_UNET}*) and the VAE ({LDM_VAE}*)")
    ignored = {p: sum(k.startswith(p) for k in keys) for p in LDM_IGNORED}
    ignored["(top-level DDPM schedule buffers)"] = sum("." not in k for k in keys)
    rest = [k for k in keys if "." in k and not k.startswith((LDM_UNET, LDM_VAE, *LDM_IGNORED))]
    if rest:
        raise ValueError(f"{source.path}: keys that a Stable Diffusion 1.x checkpoint does not have: "
                         f"{_prefix_counts(rest)}")
    return unet, vae, {k: n for k, n in ignored.items() if n}


# --- whole checkpoints ---------------------------------------------------------------------------------


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no {what} here")
    with open(path) as f:
        return json.load(f)


def load_diffusers_folder(folder: str) -> tuple[pretrained.Weights, dict]:
    """A diffusers SD 1.x folder -> (UNet in 2D mode, VAE, scheduler config) and a conversion report."""
    for part in (pretrained.UNET, pretrained.VAE):
        if not os.path.isdir(os.path.join(folder, part)):
            raise FileNotFoundError(f"{folder}: no {part}/ folder. A Stable Diffusion diffusers folder (as "
                                    f"save_pretrained writes it) holds unet/ and vae/, each with config.json and "
                                    f"diffusion_pytorch_model.safetensors or .bin")
    unet_dir, vae_dir = os.path.join(folder, pretrained.UNET), os.path.join(folder, pretrained.VAE)
    config = sd_unet_config(_read_json(os.path.join(unet_dir, pretrained.CONFIG_FILE), "UNet config.json"))
    unet_weights = find_weights(unet_dir)
    unet = unet_from_diffusers(open_state_dict(unet_weights), config, what=f"SD UNet {unet_weights}")
    _, vae = vae_convert.load_vae_folder(vae_dir)
    scheduler_path = os.path.join(folder, pretrained.SCHEDULER, pretrained.SCHEDULER_FILE)
    scheduler = (_read_json(scheduler_path, "scheduler config") if os.path.isfile(scheduler_path)
                 else pretrained.SD15_SCHEDULER_CONFIG)
    report = {"layout": "diffusers folder", "unet": os.path.abspath(unet_weights),
              "vae": os.path.abspath(find_weights(vae_dir)),
              "scheduler": os.path.abspath(scheduler_path) if os.path.isfile(scheduler_path)
              else "absent: Stable Diffusion 1.5's PNDM settings"}
    return pretrained.Weights(unet, vae, scheduler), report


def load_single_file(path: str, unet_config: Mapping | None = None,
                     vae_config: Mapping | None = None) -> tuple[pretrained.Weights, dict]:
    """An original SD 1.x .ckpt/.safetensors -> (UNet in 2D mode, VAE, SD 1.5 scheduler config) and a
    report. `unet_config`/`vae_config` are diffusers config.json dicts, SD 1.5's by default."""
    unet_part, vae_part, ignored = split_single_file(open_state_dict(path))
    config = sd_unet_config(SD15_UNET_CONFIG if unet_config is None else unet_config)
    vae_cfg = VAEConfig.sd15() if vae_config is None else VAEConfig.from_diffusers(vae_config)
    assumed = lambda given: "given" if given is not None else "Stable Diffusion 1.5 (assumed)"
    unet = unet_from_diffusers(_renamed(unet_part, ldm_unet_names(config)), config,
                               what=f"SD UNet {path} ({LDM_UNET}* keys in diffusers names; "
                                    f"config: {assumed(unet_config)})")
    vae = vae_convert.vae_from_torch(_renamed(vae_part, ldm_vae_names(vae_cfg)), vae_cfg)
    report = {"layout": "original single file (LDM names)", "unet": f"{LDM_UNET}* ({len(unet_part)} tensors)",
              "vae": f"{LDM_VAE}* ({len(vae_part)} tensors)", "unet_config": assumed(unet_config),
              "vae_config": assumed(vae_config), "ignored": ignored,
              "scheduler": "Stable Diffusion 1.5's PNDM settings"}
    return pretrained.Weights(unet, vae, pretrained.SD15_SCHEDULER_CONFIG), report


def load_stable_diffusion(src: str, *, unet_config: Mapping | None = None,
                          vae_config: Mapping | None = None) -> tuple[pretrained.Weights, dict]:
    """A diffusers folder or an original single file -> (Weights with the 2D-mode UNet, report)."""
    if os.path.isdir(src):
        if unet_config is not None or vae_config is not None:
            raise ValueError(f"{src} is a diffusers folder, which carries its own configs; separate configs are "
                             f"only for single files")
        weights, report = load_diffusers_folder(src)
    elif os.path.isfile(src):
        weights, report = load_single_file(src, unet_config, vae_config)
    else:
        raise FileNotFoundError(f"{src}: no such folder or file; pass a diffusers Stable Diffusion folder or an "
                                f"original .ckpt/.safetensors")
    return weights, {"kind": "sd", "source": os.path.abspath(src), **report}
