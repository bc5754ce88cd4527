"""Stable Diffusion's AutoencoderKL (diffusers `AutoencoderKL`), channels-last, in Flax NNX.

Submodules carry diffusers' PyTorch names (encoder.down_blocks.0.resnets.1.norm1, ...), so
`m3ddm_jax.convert.mapping.torch_name` turns a Flax path into the diffusers state-dict key. Images are
(N, H, W, 3) in [-1, 1]; latents are (N, H/f, W/f, latent_channels) with f = 2^(len(blocks) - 1).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from m3ddm_jax.models.layers import Attention, Dtype, GroupNorm, conv

# diffusers hard-codes this eps for every GroupNorm of the VAE (resnets, mid attention, output norms).
NORM_EPS = 1e-6

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"
# Keys of a diffusers config that do not change the forward pass: bookkeeping, tiling size, and the
# pipeline's fp16 upcast hint (the compute dtype is our `dtype` field).
_IGNORED_KEYS = ("sample_size", "force_upcast")
# Keys that are fine only at the value SD 1.x uses; anything else is another model family (SDXL/SD3/Flux).
_REQUIRED_VALUES = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
                    "mid_block_add_attention": True, "shift_factor": None, "latents_mean": None,
                    "latents_std": None}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL hyper-parameters. The defaults are Stable Diffusion 1.x's VAE."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    dtype: str = "float32"  # compute dtype; parameters stay float32

    def __post_init__(self):  # JSON gives lists; a tuple keeps the config hashable (static under jit)
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))

    @property
    def compute_dtype(self) -> Dtype:
        return jnp.dtype(self.dtype)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd15(cls, **overrides) -> "VAEConfig":
        """Stable Diffusion 1.5's VAE (stable-diffusion-v1-5 vae/config.json), which the defaults spell out."""
        return cls(**overrides)

    @classmethod
    def from_diffusers(cls, d: dict, **overrides) -> "VAEConfig":
        """From a diffusers AutoencoderKL config.json dict; raises ValueError for what this model lacks.

        Absent keys take this class's (SD 1.x) defaults; `overrides` replace fields, e.g. dtype="bfloat16".
        """
        fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
        known = fields | {"down_block_types", "up_block_types"} | set(_IGNORED_KEYS) | set(_REQUIRED_VALUES)
        problems = [f"unknown key {k!r}" for k in d if not k.startswith("_") and k not in known]
        if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            problems.append(f"_class_name is {d['_class_name']!r}, not 'AutoencoderKL'")
        problems += [f"{k}={d[k]!r} (only {v!r} is supported)"
                     for k, v in _REQUIRED_VALUES.items() if k in d and d[k] != v]
        n = len(d.get("block_out_channels", cls.block_out_channels))
        for key, block in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
            types = list(d.get(key, [block] * n))
            if types != [block] * n:
                problems.append(f"{key}={types} (only {n} x {block!r}, one per block_out_channels entry, "
                                f"is supported)")
        if problems:
            raise ValueError("unsupported AutoencoderKL config: " + "; ".join(problems))
        return cls(**{**{k: v for k, v in d.items() if k in fields}, **overrides})

    def to_diffusers(self) -> dict:
        """A diffusers AutoencoderKL config.json dict (what `from_diffusers` reads back)."""
        n = len(self.block_out_channels)
        return {"_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": self.in_channels,
                "out_channels": self.out_channels, "latent_channels": self.latent_channels,
                "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
                "norm_num_groups": self.norm_num_groups, "scaling_factor": self.scaling_factor,
                "down_block_types": [_DOWN_BLOCK] * n, "up_block_types": [_UP_BLOCK] * n}


class ResnetBlock(nnx.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus the input (through a 1x1 conv when widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, *, rngs: nnx.Rngs, dtype: Dtype):
        self.norm1 = GroupNorm(in_channels, groups, NORM_EPS, dtype=dtype)
        self.conv1 = conv(in_channels, out_channels, (3, 3), rngs=rngs, dtype=dtype)
        self.norm2 = GroupNorm(out_channels, groups, NORM_EPS, dtype=dtype)
        self.conv2 = conv(out_channels, out_channels, (3, 3), rngs=rngs, dtype=dtype)
        self.conv_shortcut = (conv(in_channels, out_channels, (1, 1), rngs=rngs, dtype=dtype)
                              if in_channels != out_channels else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class MidBlockAttention(Attention):
    """Single-head self-attention over all pixels, with its own GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs, dtype: Dtype):
        super().__init__(channels, heads=1, qkv_bias=True, rngs=rngs, dtype=dtype)
        self.group_norm = GroupNorm(channels, groups, NORM_EPS, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        y = super().__call__(self.group_norm(x).reshape(n, h * w, c))
        return x + y.reshape(x.shape)


class MidBlock(nnx.Module):
    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs, dtype: Dtype):
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, rngs=rngs, dtype=dtype)
                                 for _ in range(2)])
        self.attentions = nnx.List([MidBlockAttention(channels, groups, rngs=rngs, dtype=dtype)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nnx.Module):
    """Stride-2 conv3x3 after padding one zero row/column at the bottom/right only (as in SD)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: Dtype):
        self.conv = conv(channels, channels, (3, 3), strides=2, padding=0, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then conv3x3."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: Dtype):
        self.conv = conv(channels, channels, (3, 3), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownEncoderBlock(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool, *,
                 rngs: nnx.Rngs, dtype: Dtype):
        self.resnets = nnx.List([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups,
                                             rngs=rngs, dtype=dtype) for i in range(num_layers)])
        self.downsamplers = nnx.List([Downsample(out_channels, rngs=rngs, dtype=dtype)] if downsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpDecoderBlock(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool, *,
                 rngs: nnx.Rngs, dtype: Dtype):
        self.resnets = nnx.List([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups,
                                             rngs=rngs, dtype=dtype) for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample(out_channels, rngs=rngs, dtype=dtype)] if upsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nnx.Module):
    """Image -> mean | logvar moments (2 * latent_channels, before quant_conv)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        ch, g, dt = cfg.block_out_channels, cfg.norm_num_groups, cfg.compute_dtype
        self.conv_in = conv(cfg.in_channels, ch[0], (3, 3), rngs=rngs, dtype=dt)
        self.down_blocks = nnx.List([
            DownEncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < len(ch) - 1, rngs=rngs,
                             dtype=dt) for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g, rngs=rngs, dtype=dt)
        self.conv_norm_out = GroupNorm(ch[-1], g, NORM_EPS, dtype=dt)
        self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, (3, 3), rngs=rngs, dtype=dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
    """Latent -> image; each up block has layers_per_block + 1 resnets."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        ch, g, dt = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.compute_dtype
        self.conv_in = conv(cfg.latent_channels, ch[0], (3, 3), rngs=rngs, dtype=dt)
        self.mid_block = MidBlock(ch[0], g, rngs=rngs, dtype=dt)
        self.up_blocks = nnx.List([
            UpDecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, i < len(ch) - 1, rngs=rngs,
                           dtype=dt) for i in range(len(ch))])
        self.conv_norm_out = GroupNorm(ch[-1], g, NORM_EPS, dtype=dt)
        self.conv_out = conv(ch[-1], cfg.out_channels, (3, 3), rngs=rngs, dtype=dt)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class LatentCodec:
    """What the sampler and the trainer need of a latent space: scaled latents in, images out.

    Subclasses provide `encode(images) -> (mean, std)`, `decode(z)` and `config.scaling_factor`.
    """

    def encode_to_latents(self, images: jax.Array, *, key: jax.Array | None = None,
                          eps: jax.Array | None = None) -> jax.Array:
        """Scaled posterior sample (mean + std * eps) * scaling_factor.

        `eps` replays given standard-normal draws (parity with recorded runs); otherwise they are drawn
        from `key`; with neither, the posterior mean is used.
        """
        if key is not None and eps is not None:
            raise ValueError("encode_to_latents: pass either key or eps, not both")
        mean, std = self.encode(images)
        if key is not None:
            eps = jax.random.normal(key, mean.shape, jnp.float32)
        latents = mean if eps is None else mean + std * eps
        return latents * self.config.scaling_factor

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        """Scaled latents (as the UNet produces them) -> images."""
        return self.decode(latents / self.config.scaling_factor)


class AutoencoderKL(LatentCodec, nnx.Module):
    """SD's KL autoencoder. `encode`/`decode` work on unscaled latents; `encode_to_latents` and
    `decode_latents` apply `scaling_factor` (the latents the UNet sees). Outputs are float32."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        dt, lc = config.compute_dtype, config.latent_channels
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        self.quant_conv = conv(2 * lc, 2 * lc, (1, 1), rngs=rngs, dtype=dt)
        self.post_quant_conv = conv(lc, lc, (1, 1), rngs=rngs, dtype=dt)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(N, H, W, in_channels) in [-1, 1] -> posterior (mean, std), each (N, H/f, W/f, latent_channels)."""
        moments = self.quant_conv(self.encoder(images)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents (N, h, w, latent_channels) -> images (N, h*f, w*f, out_channels), about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)
