"""The discrete DDPM noise schedule of a diffusers-style scheduler config, and the forward process.

The official model was trained and is sampled with the SD 1.x schedule (`scaled_linear`, 1000 steps,
epsilon prediction). Only what that needs is supported; anything else in a config is refused rather
than silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """`torch.linspace(start, end, n, dtype=float32)`, rounding included: a float32 step, the first half
    counted up from `start`, the second half down from `end`, each value rounded once. This keeps the
    betas, and so `alphas_cumprod`, bit-identical to diffusers' (the reference fixtures record them)."""
    s, e = np.float32(start), np.float32(end)
    step = np.float64((e - s) / np.float32(n - 1))
    i = np.arange(n)
    values = np.where(i < n // 2, np.float64(s) + step * i, np.float64(e) - step * (n - 1 - i))
    return values.astype(np.float32)


def _betas(config: Mapping[str, Any]) -> np.ndarray:
    n = int(config.get("num_train_timesteps", 1000))
    if n < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {n}")
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], np.float32)
    kind = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if kind == "linear":
        return _torch_linspace_f32(start, end, n)
    if kind == "scaled_linear":
        return _torch_linspace_f32(start**0.5, end**0.5, n) ** 2
    raise ValueError(f"beta_schedule {kind!r} is not supported (use 'linear' or 'scaled_linear')")


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """alphas_cumprod (float32, as diffusers computes them) plus the inference-time settings of the config."""

    alphas_cumprod: np.ndarray
    final_alpha_cumprod: float  # alpha_bar used when a step goes below t = 0
    steps_offset: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """Reads a diffusers scheduler config dict (PNDM, DDIM and DDPM configs all work)."""
        if config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"prediction_type {config['prediction_type']!r} is not supported (only 'epsilon')")
        if config.get("timestep_spacing", "leading") != "leading":
            raise ValueError(f"timestep_spacing {config['timestep_spacing']!r} is not supported (only 'leading')")
        if config.get("clip_sample") or config.get("thresholding"):
            raise ValueError("clip_sample / thresholding are not supported: latents are not bounded to [-1, 1]")
        # float32 1 - beta, then a float64 cumulative product rounded to float32: that is what torch.cumprod
        # does on CPU, so the values match diffusers exactly.
        alphas = np.float32(1.0) - _betas(config)
        alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
        # The default is PNDMScheduler's (the official sampler's); SD configs always set it.
        final = 1.0 if config.get("set_alpha_to_one", False) else float(alphas_cumprod[0])
        return cls(alphas_cumprod, final, int(config.get("steps_offset", 0)))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def leading_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Descending inference timesteps of the "leading" spacing: k·(T // steps) + steps_offset."""
        n = self.num_train_timesteps
        if not 1 <= num_inference_steps <= n:
            raise ValueError(f"num_inference_steps must be in [1, {n}], got {num_inference_steps}")
        ratio = n // num_inference_steps
        return (np.arange(num_inference_steps)[::-1] * ratio + self.steps_offset).astype(np.int64)

    def alpha_bar(self, t: np.ndarray) -> np.ndarray:
        """alpha_bar at integer timesteps as float64; negative t gives final_alpha_cumprod."""
        t = np.asarray(t)
        return np.where(t >= 0, self.alphas_cumprod[np.maximum(t, 0)].astype(np.float64), self.final_alpha_cumprod)

    def ddim_update(
        self, t: np.ndarray, t_prev: np.ndarray, eta: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(a, b, s) with x_{t_prev} = a·x_t + b·eps + s·z, z ~ N(0, 1): the DDIM update. With eta = 0 it is
        also formula (9) of the PNDM paper. Computed in float64 (the deterministic part in PNDM's
        cancellation-free form), returned as float32."""
        at, ap = self.alpha_bar(t), self.alpha_bar(t_prev)
        s = eta * np.sqrt((1 - ap) / (1 - at) * (1 - at / ap))
        a = np.sqrt(ap / at)
        b = -(ap - at) / (at * np.sqrt(1 - ap) + np.sqrt(at * (1 - at) * ap))
        b = b + (np.sqrt(1 - ap - s**2) - np.sqrt(1 - ap))  # the share of eps that the fresh noise replaces
        return a.astype(np.float32), b.astype(np.float32), s.astype(np.float32)

    def add_noise(self, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray | int) -> jnp.ndarray:
        """q(x_t | x_0): sqrt(alpha_bar_t)·x0 + sqrt(1 − alpha_bar_t)·noise. `t` is a scalar or one timestep
        per leading batch entry of x0; it may be traced."""
        a = jnp.asarray(self.alphas_cumprod)[jnp.asarray(t)]
        a = a.reshape(a.shape + (1,) * (x0.ndim - a.ndim))
        return (jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise).astype(x0.dtype)

    def training_target(self, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray | int) -> jnp.ndarray:
        """What the UNet learns to predict from add_noise(x0, noise, t): the noise itself (epsilon
        prediction, the only type from_config accepts)."""
        del x0, t
        return noise
