"""The M3DDM 3D UNet: pseudo-3D resnets, spatial+temporal transformers, fps embedding, global-frame tokens.

Layout: video tensors are (B, F, h, w, C). The input has 9 channels: noisy latent (4), conditioning latent
(4) and mask (1). Module and parameter names follow the official PyTorch model so that checkpoints map by
name (see m3ddm_jax.convert.m3ddm). Semantics that matter for parity, as the official code has them:

- GroupNorm is joint over (group channels, F, H, W) in the resnets, the temporal-transformer `norm2` and
  `conv_norm_out`; only the spatial-transformer `norm` normalises each frame on its own.
- `attention_heads` is the number of heads (the official config calls it `attention_head_dim`).
- Every frame's cross-attention sees the same tokens of its sample row, so keys and values are projected
  once per row, not once per frame.

2D mode: with `temporal_layers`, `fps_conditioning` and `global_encoder` off, the same blocks are Stable
Diffusion's UNet2DConditionModel (each frame on its own; F = 1 is an image). The SD conversion
(m3ddm_jax.convert.sd) builds it, and the inflation (m3ddm_jax.convert.inflate) turns it into the 3D model.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from m3ddm_jax.models.attention import check_attention_impl
from m3ddm_jax.models.embeddings import TimestepEmbedding, sinusoidal_embedding
from m3ddm_jax.models.global_encoder import GlobalFrameEncoder
from m3ddm_jax.models.layers import Attention, Dtype, GroupNorm, conv, linear
from m3ddm_jax.models.remat import Remat
from m3ddm_jax.sharding import CONV_IN, CONV_OUT, EMBED, MLP

CROSS_ATTN_DOWN, PLAIN_DOWN = "CrossAttnDownBlock3D", "DownBlockP3D"
CROSS_ATTN_UP, PLAIN_UP = "CrossAttnUpBlock3D", "UpBlockP3D"
TRANSFORMER_NORM_EPS = 1e-6  # hard-coded in the official SpatialTemporalTransformer
LAYER_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class UNet3DConfig:
    """Hyper-parameters of the 3D UNet. Defaults are the released M3DDM model (SD 1.5 widths, 1.3B params)."""

    in_channels: int = 9
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN,) * 3 + (PLAIN_DOWN,)
    up_block_types: tuple[str, ...] = (PLAIN_UP,) + (CROSS_ATTN_UP,) * 3
    layers_per_block: int = 2
    attention_heads: int = 8
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 320
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    # Sinusoid periods differ between the M3DDM checkpoint (1000) and SD 1.5 (10000): never hard-code them.
    timestep_max_period: float = 1000.0
    fps_max_period: float = 30.0
    temporal_position_dim: int = 320
    temporal_position_max_period: float = 1000.0
    # All three off is the 2D mode (Stable Diffusion's UNet); the layers they add are the only difference.
    temporal_layers: bool = True  # a temporal conv in every pseudo-3D conv, a temporal transformer per attention
    fps_conditioning: bool = True  # the fps embedding and each resnet's fps projection
    global_encoder: bool = True  # the global-frame encoder that makes the cross-attention tokens
    dtype: str = "float32"
    # The attention kernel: a name of m3ddm_jax.models.attention.KERNELS, or 'auto' (the platform's best).
    attention_impl: str = "xla"
    # Rematerialisation of every resnet and transformer in training: a Remat value ('none', 'full', 'dots').
    remat: Remat = Remat.NONE

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "down_block_types", tuple(self.down_block_types))
        object.__setattr__(self, "up_block_types", tuple(self.up_block_types))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"UNet3DConfig: {n} block_out_channels but {len(self.down_block_types)} down and "
                             f"{len(self.up_block_types)} up block types")
        for t in self.down_block_types:
            if t not in (CROSS_ATTN_DOWN, PLAIN_DOWN):
                raise ValueError(f"UNet3DConfig: unknown down block type {t!r}; expected {CROSS_ATTN_DOWN!r} or "
                                 f"{PLAIN_DOWN!r}")
        for t in self.up_block_types:
            if t not in (CROSS_ATTN_UP, PLAIN_UP):
                raise ValueError(f"UNet3DConfig: unknown up block type {t!r}; expected {CROSS_ATTN_UP!r} or "
                                 f"{PLAIN_UP!r}")
        if self.layers_per_block < 1:
            raise ValueError("UNet3DConfig: layers_per_block must be >= 1")
        object.__setattr__(self, "remat", Remat.parse(self.remat))
        check_attention_impl(self.attention_impl)

    @property
    def compute_dtype(self) -> Dtype:
        return jnp.dtype(self.dtype)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, d: dict, **overrides) -> "UNet3DConfig":
        """Reads the official config.json (diffusers format). Unsupported settings raise ValueError."""
        fixed = {"act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1}
        for key, want in fixed.items():
            if key in d and d[key] != want:
                raise ValueError(f"UNet3D config: {key}={d[key]!r} is not supported (only {want!r})")
        known = {"in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
                 "layers_per_block", "norm_num_groups", "norm_eps", "cross_attention_dim", "flip_sin_to_cos",
                 "freq_shift"}
        kw: dict[str, Any] = {k: d[k] for k in known if k in d}
        if "attention_head_dim" in d:
            kw["attention_heads"] = d["attention_head_dim"]
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "UNet3DConfig":
        return cls(**{**d, **overrides})


class TemporalConv(nnx.Module):
    """A Conv1d over frames at every pixel (kernel 3, zero padding at the window ends)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: Dtype):
        self.dtype = dtype
        init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        self.kernel = nnx.Param(init(rngs.params(), (3, channels, channels), jnp.float32),
                                logical_axes=(None, CONV_IN, CONV_OUT))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32), logical_axes=(CONV_OUT,))

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel.value.astype(self.dtype)[:, None, None]  # (3, 1, 1, I, O): no transposes needed
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel, (1, 1, 1), ((1, 1), (0, 0), (0, 0)),
                                         dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return y + self.bias.value.astype(self.dtype)


class Pseudo3DConv(nnx.Module):
    """A 3x3 conv on every frame, then (unless `temporal` is off) a temporal conv at every pixel, with no
    activation between."""

    def __init__(self, cin: int, cout: int, temporal: bool, *, rngs: nnx.Rngs, dtype: Dtype):
        self.spatial_conv = conv(cin, cout, (3, 3), rngs=rngs, dtype=dtype)
        self.temporal_conv = TemporalConv(cout, rngs=rngs, dtype=dtype) if temporal else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.spatial_conv(x)
        return x if self.temporal_conv is None else self.temporal_conv(x)


class FeedForward(nnx.Module):
    """GEGLU feed-forward: Linear C -> 8C, value * GELU(gate) (exact GELU), Linear 4C -> C."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype: Dtype, mult: int = 4):
        self.proj = linear(dim, 2 * mult * dim, axes=(EMBED, MLP), rngs=rngs, dtype=dtype)
        self.out = linear(mult * dim, dim, axes=(MLP, EMBED), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return self.out(value * jax.nn.gelu(gate, approximate=False))


class TransformerBlock(nnx.Module):
    """Pre-LayerNorm block: self-attention, a second attention (cross- or self-), GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int | None, *, rngs: nnx.Rngs, dtype: Dtype,
                 attention_impl: str):
        norm = lambda: nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        attn = lambda ctx: Attention(dim, heads, context_dim=ctx, rngs=rngs, dtype=dtype,
                                     attention_impl=attention_impl)
        self.norm1, self.attn1 = norm(), attn(None)
        self.norm2, self.attn2 = norm(), attn(context_dim)
        self.norm3, self.ff = norm(), FeedForward(dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """x: (G, S, T, C), attention over T within each (G, S). With `context` (G, L, Cc), attn2 lets all
        S*T queries of group G attend to its L tokens; without it, attn2 is self-attention over T."""
        g, s, t, c = x.shape
        per_seq = lambda y: y.reshape(g * s, t, c)
        x = x + self.attn1(per_seq(self.norm1(x))).reshape(x.shape)
        h = self.norm2(x)
        h = self.attn2(per_seq(h)) if context is None else self.attn2(h.reshape(g, s * t, c), context)
        x = x + h.reshape(x.shape)
        return x + self.ff(self.norm3(x))


class SpatialTemporalTransformer(nnx.Module):
    """Spatial transformer per frame (with cross-attention to the global tokens), then a temporal
    transformer over the frames at every pixel, each with its own residual. Without `temporal_layers`
    only the spatial part exists (SD's Transformer2DModel)."""

    def __init__(self, channels: int, cfg: UNet3DConfig, *, rngs: nnx.Rngs):
        dt, heads, groups = cfg.compute_dtype, cfg.attention_heads, cfg.norm_num_groups
        block = lambda ctx: TransformerBlock(channels, heads, ctx, rngs=rngs, dtype=dt,
                                             attention_impl=cfg.attention_impl)
        self.pos_dim, self.pos_max_period = cfg.temporal_position_dim, cfg.temporal_position_max_period
        self.norm = GroupNorm(channels, groups, TRANSFORMER_NORM_EPS, dtype=dt)
        # proj_in / proj_out map feature-map channels into the transformer's residual width and back.
        self.proj_in = linear(channels, channels, axes=(CONV_IN, EMBED), rngs=rngs, dtype=dt)
        self.transformer_blocks = nnx.List([block(cfg.cross_attention_dim)])
        self.proj_out = linear(channels, channels, axes=(EMBED, CONV_OUT), rngs=rngs, dtype=dt)
        self.temporal = cfg.temporal_layers
        if self.temporal:
            self.norm2 = GroupNorm(channels, groups, TRANSFORMER_NORM_EPS, dtype=dt)
            self.proj_in2 = linear(channels, channels, axes=(CONV_IN, EMBED), rngs=rngs, dtype=dt)
            self.temporal_position_embed_proj = TimestepEmbedding(self.pos_dim, channels, rngs=rngs, dtype=dt)
            self.transformer_blocks2 = nnx.List([block(None)])
            self.proj_out2 = linear(channels, channels, axes=(EMBED, CONV_OUT), rngs=rngs, dtype=dt)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, f, h, w, c = x.shape
        y = self.proj_in(self.norm(x, batch_axes=2)).reshape(b, f, h * w, c)
        for blk in self.transformer_blocks:
            y = blk(y, context)
        x = x + self.proj_out(y).reshape(x.shape)
        if not self.temporal:
            return x

        y = self.proj_in2(self.norm2(x, batch_axes=1))
        y = y.transpose(0, 2, 3, 1, 4).reshape(b, h * w, f, c)
        # Positions restart at 0 in every call: the embedding is relative to the window.
        pos = sinusoidal_embedding(jnp.arange(f), self.pos_dim, max_period=self.pos_max_period)
        y = y + self.temporal_position_embed_proj(pos.astype(y.dtype))
        for blk in self.transformer_blocks2:
            y = blk(y)
        y = y.reshape(b, h, w, f, c).transpose(0, 3, 1, 2, 4)
        return x + self.proj_out2(y)


class ResnetBlockP3D(nnx.Module):
    """GroupNorm -> SiLU -> pseudo-3D conv -> + time and fps projections -> GroupNorm -> SiLU -> pseudo-3D
    conv, plus a 1x1x1 shortcut where the width changes. Without `fps_conditioning` there is no fps
    projection (SD's ResnetBlock2D)."""

    def __init__(self, cin: int, cout: int, cfg: UNet3DConfig, *, rngs: nnx.Rngs):
        dt, temb = cfg.compute_dtype, 4 * cfg.block_out_channels[0]
        self.norm1 = GroupNorm(cin, cfg.norm_num_groups, cfg.norm_eps, dtype=dt)
        self.conv1 = Pseudo3DConv(cin, cout, cfg.temporal_layers, rngs=rngs, dtype=dt)
        # The embeddings' width onto the conv channels they are added to.
        self.time_emb_proj = linear(temb, cout, axes=(EMBED, CONV_OUT), rngs=rngs, dtype=dt)
        self.fps_emb_proj = (linear(temb, cout, axes=(EMBED, CONV_OUT), rngs=rngs, dtype=dt) if cfg.fps_conditioning
                             else None)
        self.norm2 = GroupNorm(cout, cfg.norm_num_groups, cfg.norm_eps, dtype=dt)
        self.conv2 = Pseudo3DConv(cout, cout, cfg.temporal_layers, rngs=rngs, dtype=dt)
        # A 1x1x1 convolution, as a dense layer on the channels.
        self.conv_shortcut = linear(cin, cout, axes=(CONV_IN, CONV_OUT), rngs=rngs, dtype=dt) if cin != cout else None

    def __call__(self, x: jax.Array, temb: jax.Array, femb: jax.Array | None) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = h + self.time_emb_proj(nnx.silu(temb))[:, None, None, None]
        if self.fps_emb_proj is not None:
            h = h + self.fps_emb_proj(nnx.silu(femb))[:, None, None, None]
        h = self.conv2(nnx.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Resample(nnx.Module):
    """A per-frame 3x3 conv, after nearest x2 upsampling (up) or with stride 2 (down)."""

    def __init__(self, channels: int, up: bool, *, rngs: nnx.Rngs, dtype: Dtype):
        self.up = up
        self.conv = conv(channels, channels, (3, 3), strides=1 if up else 2, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.up:
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        return self.conv(x)


class UNetBlock(nnx.Module):
    """A down or up block: `num_layers` x (resnet [-> transformer]), then an optional resampler.

    Up blocks concatenate a skip connection ([current, skip] on channels) before every resnet.
    """

    def __init__(self, resnet_channels: Sequence[tuple[int, int]], cross_attention: bool, resample: str | None,
                 cfg: UNet3DConfig, *, rngs: nnx.Rngs):
        cout = resnet_channels[-1][1]
        self.remat = cfg.remat
        self.resnets = nnx.List([ResnetBlockP3D(i, o, cfg, rngs=rngs) for i, o in resnet_channels])
        self.attentions = (nnx.List([SpatialTemporalTransformer(o, cfg, rngs=rngs) for _, o in resnet_channels])
                           if cross_attention else None)
        make = lambda up: nnx.List([Resample(cout, up, rngs=rngs, dtype=cfg.compute_dtype)])
        self.downsamplers = make(False) if resample == "down" else None
        self.upsamplers = make(True) if resample == "up" else None

    def _layer(self, i, x, temb, femb, context):
        x = self.remat.wrap(lambda m, x: m(x, temb, femb))(self.resnets[i], x)
        return x if self.attentions is None else self.remat.wrap(lambda m, x: m(x, context))(self.attentions[i], x)

    def down(self, x, temb, femb, context) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for i in range(len(self.resnets)):
            x = self._layer(i, x, temb, femb, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips

    def up(self, x, skips: list[jax.Array], temb, femb, context) -> jax.Array:
        for i in range(len(self.resnets)):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = self._layer(i, x, temb, femb, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nnx.Module):
    """resnet -> transformer -> resnet."""

    def __init__(self, channels: int, cfg: UNet3DConfig, *, rngs: nnx.Rngs):
        self.remat = cfg.remat
        self.resnets = nnx.List([ResnetBlockP3D(channels, channels, cfg, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([SpatialTemporalTransformer(channels, cfg, rngs=rngs)])

    def __call__(self, x, temb, femb, context):
        resnet = self.remat.wrap(lambda m, x: m(x, temb, femb))
        x = resnet(self.resnets[0], x)
        x = self.remat.wrap(lambda m, x: m(x, context))(self.attentions[0], x)
        return resnet(self.resnets[1], x)


class UNet3D(nnx.Module):
    """eps = unet(sample, timesteps, fps, tokens).

    sample (B, F, h, w, 9); timesteps and fps scalars or (B,); tokens (B, L, cross_attention_dim) from
    `encode_global`. h and w must be multiples of `config.downsample_factor`. In 2D mode (SD) the sample
    has `in_channels` (4), fps is unused (pass None) and tokens are the text embeddings.
    """

    def __init__(self, config: UNet3DConfig, *, rngs: nnx.Rngs):
        self.config = cfg = config
        dt, ch = cfg.compute_dtype, cfg.block_out_channels
        temb = 4 * ch[0]
        self.conv_in = conv(cfg.in_channels, ch[0], (3, 3), rngs=rngs, dtype=dt)
        self.time_embedding = TimestepEmbedding(ch[0], temb, rngs=rngs, dtype=dt)
        self.fps_embedding = (TimestepEmbedding(ch[0], temb, rngs=rngs, dtype=dt) if cfg.fps_conditioning
                              else None)

        n, layers = len(ch), cfg.layers_per_block
        down = []
        for i, kind in enumerate(cfg.down_block_types):
            cin = ch[max(i - 1, 0)]
            resnets = [(cin if j == 0 else ch[i], ch[i]) for j in range(layers)]
            down.append(UNetBlock(resnets, kind == CROSS_ATTN_DOWN, "down" if i < n - 1 else None, cfg, rngs=rngs))
        self.down_blocks = nnx.List(down)
        self.mid_block = MidBlock(ch[-1], cfg, rngs=rngs)

        # Skip widths, in the order the up path consumes them (last produced first).
        skip_widths = [ch[0]] + [ch[i] for i in range(n) for _ in range(layers + (i < n - 1))]
        up, prev = [], ch[-1]
        for i, kind in enumerate(cfg.up_block_types):
            out = ch[n - 1 - i]
            resnets = []
            for j in range(layers + 1):
                resnets.append(((prev if j == 0 else out) + skip_widths.pop(), out))
            up.append(UNetBlock(resnets, kind == CROSS_ATTN_UP, "up" if i < n - 1 else None, cfg, rngs=rngs))
            prev = out
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = GroupNorm(ch[0], cfg.norm_num_groups, cfg.norm_eps, dtype=dt)
        self.conv_out = Pseudo3DConv(ch[0], cfg.out_channels, cfg.temporal_layers, rngs=rngs, dtype=dt)
        self.global_img_encoder = (GlobalFrameEncoder(cfg.out_channels, cfg.cross_attention_dim, rngs=rngs, dtype=dt)
                                   if cfg.global_encoder else None)

    def encode_global(self, latents: jax.Array, rows: int) -> jax.Array:
        """Global-frame VAE latents (rows * g, hg, wg, 4) -> tokens (rows, g * h' * w', cross_attention_dim).

        The unconditional global context is `encode_global(zeros)`, not zero tokens."""
        if self.global_img_encoder is None:
            raise ValueError("this UNet has no global-frame encoder (config.global_encoder is off, e.g. the 2D SD "
                             "UNet): pass its context tokens to the forward directly")
        return self.global_img_encoder.tokens(latents, rows)

    def __call__(self, sample: jax.Array, timesteps: jax.Array, fps: jax.Array | None,
                 tokens: jax.Array) -> jax.Array:
        cfg = self.config
        b, f, h, w, c = sample.shape
        if c != cfg.in_channels:
            raise ValueError(f"UNet3D: sample has {c} channels, the model expects {cfg.in_channels}")
        k = cfg.downsample_factor
        if h % k or w % k:
            raise ValueError(f"UNet3D: latent size {h}x{w} is not a multiple of {k} (pixel sizes must be "
                             f"multiples of {8 * k}); pad or resize the canvas")
        if tokens.shape[0] != b:
            raise ValueError(f"UNet3D: {tokens.shape[0]} token rows for a batch of {b}")
        ch0 = cfg.block_out_channels[0]
        embed = lambda v, period: sinusoidal_embedding(jnp.broadcast_to(jnp.asarray(v, jnp.float32), (b,)), ch0,
                                                       max_period=period, flip_sin_to_cos=cfg.flip_sin_to_cos,
                                                       freq_shift=cfg.freq_shift)
        dt = cfg.compute_dtype
        temb = self.time_embedding(embed(timesteps, cfg.timestep_max_period).astype(dt))
        if self.fps_embedding is None:
            femb = None
        elif fps is None:
            raise ValueError("UNet3D: this model is conditioned on fps; pass fps (frames per second / stride)")
        else:
            femb = self.fps_embedding(embed(fps, cfg.fps_max_period).astype(dt))
        context = tokens.astype(dt)

        x = self.conv_in(sample.astype(dt))
        skips = [x]
        for block in self.down_blocks:
            x, s = block.down(x, temb, femb, context)
            skips += s
        x = self.mid_block(x, temb, femb, context)
        for block in self.up_blocks:
            x = block.up(x, skips, temb, femb, context)
        x = self.conv_out(nnx.silu(self.conv_norm_out(x)))
        return x.astype(jnp.float32)
