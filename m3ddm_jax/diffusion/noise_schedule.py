"""The discrete DDPM noise schedule of a diffusers-style scheduler config, and the forward process.

The official model was trained and is sampled with the SD 1.x schedule (`scaled_linear`, 1000 steps,
epsilon prediction, "leading" timesteps). Beyond it, with diffusers' names and meanings (a run's
scheduler config is exported with its model, so the samplers read what the model was trained with):

* `prediction_type: "v_prediction"`: the UNet predicts v = sqrt(a) eps - sqrt(1 - a) x0 (a = alpha_bar_t;
  Salimans & Ho 2022), whose scale stays bounded at every noise level;
* `rescale_betas_zero_snr: true`: the betas rescaled so that the last timestep has zero SNR (Lin et al.
  2024, Algorithm 1): training then sees pure noise at t = T - 1, as sampling starts. It needs
  v-prediction (epsilon cannot give the clean latent from pure noise);
* `timestep_spacing: "trailing"`: inference timesteps counted down from T - 1, so sampling starts at the
  last (zero-SNR) timestep.

Anything else in a config is refused rather than silently ignored.
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


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose sqrt(alpha_bar) is shifted to end at exactly 0 and scaled to keep its first value (Lin et
    al. 2024, Algorithm 1; diffusers' rescale_zero_terminal_snr). Float64 inside, float32 out."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas.astype(np.float64)))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (1.0 - alphas).astype(np.float32)


PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing")


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """alphas_cumprod (float32, as diffusers computes them) plus the inference-time settings of the config."""

    alphas_cumprod: np.ndarray
    final_alpha_cumprod: float  # alpha_bar used when a step goes below t = 0
    steps_offset: int
    prediction_type: str = "epsilon"  # what the UNet predicts: one of PREDICTION_TYPES
    timestep_spacing: str = "leading"  # how inference timesteps are spread: one of TIMESTEP_SPACINGS

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """Reads a diffusers scheduler config dict (PNDM, DDIM and DDPM configs all work)."""
        prediction = config.get("prediction_type") or "epsilon"
        spacing = config.get("timestep_spacing") or "leading"
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction!r} is not supported (use one of {PREDICTION_TYPES})")
        if spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing {spacing!r} is not supported (use one of {TIMESTEP_SPACINGS})")
        if config.get("clip_sample") or config.get("thresholding"):
            raise ValueError("clip_sample / thresholding are not supported: latents are not bounded to [-1, 1]")
        betas = _betas(config)
        if config.get("rescale_betas_zero_snr"):
            if prediction != "v_prediction":
                raise ValueError("rescale_betas_zero_snr needs prediction_type 'v_prediction': at the zero-SNR "
                                 "last timestep the input is pure noise, from which an epsilon prediction cannot "
                                 "give the clean latent")
            betas = rescale_zero_terminal_snr(betas)
        # float32 1 - beta, then a float64 cumulative product rounded to float32: that is what torch.cumprod
        # does on CPU, so the values match diffusers exactly.
        alphas = np.float32(1.0) - betas
        alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
        # The default is PNDMScheduler's (the official sampler's); SD configs always set it.
        final = 1.0 if config.get("set_alpha_to_one", False) else float(alphas_cumprod[0])
        return cls(alphas_cumprod, final, int(config.get("steps_offset", 0)), prediction, spacing)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def inference_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Descending inference timesteps, diffusers' rule for the spacing: "leading" k·(T // steps) +
        steps_offset; "trailing" round(T - k·T / steps) - 1 (from T - 1 down)."""
        n = self.num_train_timesteps
        if not 1 <= num_inference_steps <= n:
            raise ValueError(f"num_inference_steps must be in [1, {n}], got {num_inference_steps}")
        if self.timestep_spacing == "trailing":
            return (np.round(np.arange(n, 0, -n / num_inference_steps)) - 1).astype(np.int64)
        ratio = n // num_inference_steps
        return (np.arange(num_inference_steps)[::-1] * ratio + self.steps_offset).astype(np.int64)

    def snr(self, t: jnp.ndarray) -> jnp.ndarray:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at integer timesteps (may be traced)."""
        a = jnp.asarray(self.alphas_cumprod)[jnp.asarray(t)]
        return a / (1.0 - a)

    def alpha_bar(self, t: np.ndarray) -> np.ndarray:
        """alpha_bar at integer timesteps as float64; negative t gives final_alpha_cumprod."""
        t = np.asarray(t)
        return np.where(t >= 0, self.alphas_cumprod[np.maximum(t, 0)].astype(np.float64), self.final_alpha_cumprod)

    def ddim_update(
        self, t: np.ndarray, t_prev: np.ndarray, eta: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(a, b, s) with x_{t_prev} = a·x_t + b·y + s·z, z ~ N(0, 1): the DDIM update from the UNet's
        prediction y (the schedule's prediction_type). For epsilon with eta = 0 it is also formula (9) of the
        PNDM paper. Computed in float64 (epsilon's deterministic part in PNDM's cancellation-free form),
        returned as float32. The v form, x_prev = sqrt(ap)·x0 + sqrt(1 - ap - s²)·eps + s·z with x0 and eps
        written in x_t and v, has no division: it holds at zero SNR (alpha_bar_t = 0) too. It is also
        diffusers' PNDM step on a (combined) v prediction, which converts v to eps at t and then steps."""
        at, ap = self.alpha_bar(t), self.alpha_bar(t_prev)
        s = eta * np.sqrt((1 - ap) / (1 - at) * (1 - at / ap))
        if self.prediction_type == "v_prediction":
            c = np.sqrt(1 - ap - s**2)
            a = np.sqrt(ap * at) + c * np.sqrt(1 - at)
            b = c * np.sqrt(at) - np.sqrt(ap * (1 - at))
            return a.astype(np.float32), b.astype(np.float32), s.astype(np.float32)
        a = np.sqrt(ap / at)
        b = -(ap - at) / (at * np.sqrt(1 - ap) + np.sqrt(at * (1 - at) * ap))
        b = b + (np.sqrt(1 - ap - s**2) - np.sqrt(1 - ap))  # the share of eps that the fresh noise replaces
        return a.astype(np.float32), b.astype(np.float32), s.astype(np.float32)

    def add_noise(self, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray | int) -> jnp.ndarray:
        """q(x_t | x_0): sqrt(alpha_bar_t)·x0 + sqrt(1 − alpha_bar_t)·noise. `t` is a scalar or one timestep
        per leading batch entry of x0; it may be traced."""
        sa, s1a = self._sqrt_alphas(t, x0)
        return (sa * x0 + s1a * noise).astype(x0.dtype)

    def _sqrt_alphas(self, t, like: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped to broadcast against `like` (t: scalar or one
        per leading entry)."""
        a = jnp.asarray(self.alphas_cumprod)[jnp.asarray(t)]
        a = a.reshape(a.shape + (1,) * (like.ndim - a.ndim))
        return jnp.sqrt(a), jnp.sqrt(1 - a)

    def training_target(self, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray | int) -> jnp.ndarray:
        """What the UNet learns to predict from add_noise(x0, noise, t): the noise (epsilon prediction) or
        v = sqrt(a)·noise - sqrt(1 - a)·x0 (v_prediction)."""
        if self.prediction_type == "epsilon":
            return noise
        sa, s1a = self._sqrt_alphas(t, x0)
        return sa * noise - s1a * x0

    def predicted_noise(self, xt: jnp.ndarray, output: jnp.ndarray, t: jnp.ndarray | int) -> jnp.ndarray:
        """The noise that the UNet's prediction `output` at (xt, t) implies (jnp, `t` may be traced)."""
        if self.prediction_type == "epsilon":
            return output
        sa, s1a = self._sqrt_alphas(t, xt)
        return s1a * xt + sa * output
