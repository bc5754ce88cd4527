"""The window sampler: the whole denoising loop of a batch of 16-frame windows as one jitted function.

One call runs every step (`jax.lax.scan`, no host round trip) for B windows at once. Each step evaluates
the UNet on B x k rows, k = the guidance branches, and combines them with the official formulas. A branch
is named by its local and global context, 'u'nconditional or 'c'onditional:

* local 'c': the masked frames' latents and the mask; local 'u': the latent of a black frame and an
  all-ones mask. Guide frames (latents that earlier windows produced) replace the local latent, with
  mask 0, in BOTH (as the official pipeline does).
* global 'c': the tokens of the video's global frames; global 'u': the tokens of zero latents. Both are
  computed once per video by the caller.

4-way guidance (global_scale > 1): eps = e_uu + scale (e_cu - e_uu) + global_scale (e_cc - e_cu). The
official code also evaluates the 'uc' branch and drops it; `exact_branches=True` does the same (for
parity checks), the default skips it (3 branches, same result).
2-way (scale > 1, global_scale <= 1): eps = e_uu + scale (e_cc - e_uu).
Without guidance (both <= 1, which the official code cannot run): eps = e_cc.

Rows are window-major (row = window * k + branch), so sharding the window axis over devices keeps each
window's branches on one device.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from m3ddm_jax.diffusion import NoiseSchedule, make_sampler
from m3ddm_jax.flops import count_flops
from m3ddm_jax.jitting import Static, model_jit
from m3ddm_jax.models.unet3d import UNet3D
from m3ddm_jax.sampling.schedule import WINDOW
from m3ddm_jax.sharding import WINDOWS


class WindowInputs(NamedTuple):
    """A batch of B windows of F frames, latents (h, w, C) channels-last (C = 4 for SD's VAE). Arrays marked "B or 1" may have a
    leading 1 and are then shared by every window (no copies)."""

    init_latents: jax.Array  # (B, F, h, w, 4) the start: add_noise(init_latents, noise, start t) (officially
    #                          the latents of the TELEA-inpainted canvas frames)
    cond_latents: jax.Array  # (B, F, h, w, 4) the masked canvas frames' latents: the local condition
    mask: jax.Array  # broadcastable to (B, F, h, w, 1); 1 = generate
    guide_latents: jax.Array  # (B, F, h, w, 4) already outpainted latents, read where guide_flags
    guide_flags: jax.Array  # (B, F) bool
    uncond_latent: jax.Array  # broadcastable to (B, F, h, w, 4): the black frame's latent
    fps: jax.Array  # (B,) the official video fps // stride; truncated to an integer like the official int64
    cond_tokens: jax.Array  # (B or 1, L, C) global-frame tokens
    uncond_tokens: jax.Array  # (B or 1, L, C) tokens of zero latents


WINDOWS_PER_DEVICE = 4  # default most windows per device in one sampler call (x 3 branches x 16 frames)


def window_mesh(devices) -> Mesh:
    """The 1-D mesh ('windows') that a batch of windows is split over."""
    return Mesh(np.asarray(list(devices)), (WINDOWS,))


def windows_per_call(requested: int, num_devices: int) -> int:
    """The most windows in one sampler call: `requested` (0: WINDOWS_PER_DEVICE per device), rounded up to a
    multiple of the devices."""
    return num_devices * math.ceil((requested or WINDOWS_PER_DEVICE * num_devices) / num_devices)


def call_spec(mesh: Mesh, windows: int, latent_hw: tuple[int, int], channels: int, tokens, *,
              frames: int = WINDOW) -> tuple[WindowInputs, jax.ShapeDtypeStruct]:
    """Shapes, dtypes and shardings of one sampler call as the Outpainter issues it, and as
    tools/aot_compile.py compiles it: (inputs, initial noise) for `windows` windows of `frames` frames of
    latents (h, w, channels) over a 1-D 'windows' mesh. Per-window arrays are split over the mesh when the
    windows divide over it; the arrays every window shares (leading 1: the mask, the black frame's latent,
    the global tokens, shaped like `tokens` (1, L, C)) and the initial noise are replicated."""
    h, w = latent_hw
    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec(WINDOWS)) if windows % mesh.size == 0 else replicated
    each = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct((windows, *shape), dtype, sharding=split)
    shared = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct((1, *shape), dtype, sharding=replicated)
    latents = (frames, h, w, channels)
    token = shared(tokens.shape[1:], jax.dtypes.canonicalize_dtype(tokens.dtype))
    inputs = WindowInputs(init_latents=each(latents), cond_latents=each(latents), mask=shared((1, h, w, 1)),
                          guide_latents=each(latents), guide_flags=each((frames,), jnp.bool_),
                          uncond_latent=shared((1, h, w, channels)), fps=each(()), cond_tokens=token,
                          uncond_tokens=token)
    return inputs, shared(latents)


def place(values, spec):
    """`values` (arrays in the structure of `spec`) on the devices `spec` names, widened to its dtypes (e.g.
    the bfloat16 latents of a bfloat16 VAE: exact, and the sampler computes in float32). Another shape, or a
    dtype that would have to narrow, is an error: the call would compile for what tools/aot_compile.py did
    not check."""
    def one(x, s):
        dtype = jnp.result_type(x)
        if np.shape(x) != s.shape or jnp.promote_types(dtype, s.dtype) != s.dtype:
            raise ValueError(f"sampler call input {dtype}{list(np.shape(x))} does not fit its spec "
                             f"{s.dtype}{list(s.shape)} (sampling.window.call_spec)")
        return jax.device_put(x if dtype == s.dtype else jnp.asarray(x, s.dtype), s.sharding)
    return jax.tree.map(one, values, spec)


def _in_mesh(tree):
    """jax.set_mesh over the mesh the arrays are placed on (kernels XLA cannot partition, Pallas splash
    attention, then run per shard), or nothing for single-device arrays."""
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return jax.set_mesh(sharding.mesh)
    return contextlib.nullcontext()


def guidance_branches(scale: float, global_scale: float, exact: bool = False) -> tuple[str, ...]:
    """The branches (local + global context) that the guidance of these scales evaluates, in row order."""
    if global_scale > 1:
        return ("uu", "cu", "uc", "cc") if exact else ("uu", "cu", "cc")
    return ("uu", "cc") if scale > 1 else ("cc",)


def combine(eps: dict[str, jax.Array], scale, global_scale) -> jax.Array:
    """The guided prediction from per-branch predictions (the official formulas, in its order)."""
    if "cu" in eps:
        return eps["uu"] + scale * (eps["cu"] - eps["uu"]) + global_scale * (eps["cc"] - eps["cu"])
    if "uu" in eps:
        return eps["uu"] + scale * (eps["cc"] - eps["uu"])
    return eps["cc"]


@functools.lru_cache(maxsize=None)
def _scheduler(kind: str, steps: int, config_json: str, strength: float = 1.0):
    """(schedule, sampler) for a hashable description: one object per description, so that jit caches keyed
    on it are shared by every WindowSampler (and every video) with the same settings."""
    schedule = NoiseSchedule.from_config(json.loads(config_json))
    return schedule, make_sampler(kind, schedule, steps, strength=strength)


class BranchRows(NamedTuple):
    """The step-independent part of the UNet input, B x k rows."""

    context: jax.Array  # (B*k, F, h, w, C + 1): local latent | mask
    fps: jax.Array  # (B*k,)
    tokens: jax.Array  # (B*k, L, C)


def _rows(inputs: WindowInputs, branches: tuple[str, ...]) -> BranchRows:
    b, f, h, w, c = inputs.cond_latents.shape
    k = len(branches)
    guide = inputs.guide_flags[:, :, None, None, None]
    mask = jnp.broadcast_to(inputs.mask, (b, f, h, w, 1)).astype(jnp.float32)
    local = {
        "c": (jnp.where(guide, inputs.guide_latents, inputs.cond_latents), jnp.where(guide, 0.0, mask)),
        "u": (jnp.where(guide, inputs.guide_latents, jnp.broadcast_to(inputs.uncond_latent, (b, f, h, w, c))),
              jnp.where(guide, 0.0, jnp.ones_like(mask))),
    }
    context = jnp.stack([jnp.concatenate(local[br[0]], axis=-1) for br in branches], axis=1)
    tokens = {"c": inputs.cond_tokens, "u": inputs.uncond_tokens}
    tokens = jnp.stack([jnp.broadcast_to(tokens[br[1]], (b,) + tokens[br[1]].shape[1:]) for br in branches], axis=1)
    fps = jnp.repeat(jnp.trunc(jnp.asarray(inputs.fps, jnp.float32)), k)
    return BranchRows(context.reshape(b * k, f, h, w, c + 1), fps, tokens.reshape(b * k, *tokens.shape[2:]))


def _unet_input(latents: jax.Array, rows: BranchRows) -> jax.Array:
    """(B, F, h, w, C) latents -> (B*k, F, h, w, 2C + 1): noisy latent | local latent | mask."""
    k = rows.context.shape[0] // latents.shape[0]
    return jnp.concatenate([jnp.repeat(latents, k, axis=0), rows.context], axis=-1)


def _denoise(unet: UNet3D, sampler, branches, rows: BranchRows, scales, state, latents, i):
    """One step: the UNet on every branch row, guidance, the sampler update."""
    t = jnp.asarray(sampler.timesteps, jnp.float32)[i]
    eps = unet(_unet_input(latents, rows), t, rows.fps, rows.tokens)
    eps = eps.reshape(latents.shape[0], len(branches), *eps.shape[1:])
    guided = combine({br: eps[:, j] for j, br in enumerate(branches)}, scales[0], scales[1])
    return sampler.step(state, latents, guided, i)


def _start(sampler_key, branches, inputs: WindowInputs, noise):
    schedule, sampler = _scheduler(*sampler_key)
    latents = schedule.add_noise(inputs.init_latents.astype(jnp.float32), noise.astype(jnp.float32),
                                 sampler.start_timestep)
    return _rows(inputs, branches), sampler.init_state(latents), latents


@model_jit
def _sample(static: Static, params, inputs: WindowInputs, noise, scales):
    graphdef, sampler_key, branches = static.value
    unet = nnx.merge(graphdef, params)
    sampler = _scheduler(*sampler_key)[1]
    rows, state, latents = _start(sampler_key, branches, inputs, noise)

    def body(carry, i):
        return _denoise(unet, sampler, branches, rows, scales, *carry, i), None

    (_, latents), _ = jax.lax.scan(body, (state, latents), jnp.arange(len(sampler.timesteps)))
    return latents


# The Python-loop path (benchmark baseline, step-by-step inspection): the same functions, one call per step.
_start_jit = jax.jit(_start, static_argnums=(0, 1))


@model_jit
def _step_jit(static: Static, params, rows, scales, state, latents, i):
    graphdef, sampler_key, branches = static.value
    sampler = _scheduler(*sampler_key)[1]
    return _denoise(nnx.merge(graphdef, params), sampler, branches, rows, scales, state, latents, i)


class WindowSampler:
    """Samples batches of windows with one UNet and fixed sampler settings.

    `scheduler` is 'pndm' (the official loop, M3DDM quirk included: it starts at the second timestep of
    diffusers' list and visits it twice) or 'ddim' (deterministic, eta 0); `strength` < 1 starts partway
    (img2img, m3ddm_jax/diffusion/samplers.py). `loop='python'` drives the same
    steps from the host, one jitted call each (a baseline for benchmarks; results are the same).
    Compiled code is cached per model structure, settings and input shapes, and shared between instances.
    """

    def __init__(self, unet: UNet3D, scheduler_config: dict, *, steps: int = 50, scheduler: str = "pndm",
                 guidance_scale: float = 2.0, global_guidance_scale: float = 4.0, exact_branches: bool = False,
                 loop: str = "scan", strength: float = 1.0):
        if loop not in ("scan", "python"):
            raise ValueError(f"loop must be 'scan' or 'python', got {loop!r}")
        self.sampler_key = (scheduler, int(steps), json.dumps(scheduler_config, sort_keys=True), float(strength))
        _scheduler(*self.sampler_key)  # fail now on a bad scheduler, step count or config
        self.branches = guidance_branches(guidance_scale, global_guidance_scale, exact_branches)
        self.scales = jnp.asarray([guidance_scale, global_guidance_scale], jnp.float32)
        self.graphdef, self.params = nnx.split(unet)
        self._static = Static((self.graphdef, self.sampler_key, self.branches))
        self.loop = loop

    @property
    def steps(self) -> int:
        """UNet calls per window: the step count, or its last floor(strength x steps) when starting partway."""
        return len(_scheduler(*self.sampler_key)[1].timesteps)

    def put_params(self, sharding) -> None:
        """Places the UNet parameters (e.g. replicated over a device mesh)."""
        self.params = jax.device_put(self.params, sharding)

    def __call__(self, inputs: WindowInputs, *, noise: jax.Array | None = None,
                 key: jax.Array | None = None) -> jax.Array:
        """Denoised latents (B, F, h, w, 4) float32. The initial noise (B or 1, F, h, w, 4) is given (1: the
        same for every window, as officially), or drawn from `key`."""
        if (noise is None) == (key is None):
            raise ValueError("WindowSampler: pass exactly one of noise and key")
        if noise is None:
            noise = jax.random.normal(key, inputs.init_latents.shape, jnp.float32)
        with _in_mesh(inputs):
            if self.loop == "scan":
                return _sample(self._static, self.params, inputs, noise, self.scales)
            rows, state, latents = _start_jit(self.sampler_key, self.branches, inputs, noise)
            for i in range(self.steps):
                state, latents = _step_jit(self._static, self.params, rows, self.scales, state, latents, i)
            return latents

    def lower(self, params, inputs: WindowInputs, noise):
        """The scan-loop call lowered for abstract arguments (ShapeDtypeStructs with shardings, e.g. from
        `call_spec`; `params` like this sampler's): what tools/aot_compile.py compiles."""
        scales = jax.ShapeDtypeStruct(self.scales.shape, self.scales.dtype, sharding=noise.sharding)
        with _in_mesh(inputs):
            return _sample.lower(self._static, params, inputs, noise, scales)

    def flops(self, params, inputs: WindowInputs, noise) -> int:
        """Analytic FLOPs (m3ddm_jax.flops) of one scan-loop call, every step, for abstract arguments."""
        scales = jax.ShapeDtypeStruct(self.scales.shape, self.scales.dtype)
        return count_flops(lambda *args: _sample(self._static, *args), params, inputs, noise, scales)

    def unet_rows(self, inputs: WindowInputs, latents: jax.Array) -> tuple[jax.Array, BranchRows]:
        """The UNet input (B*k, F, h, w, 9) for `latents` and the rows' fps and tokens (for inspection)."""
        rows = _rows(inputs, self.branches)
        return _unet_input(latents, rows), rows
