"""The sampler settings: one object, one set of names, for every place that outpaints.

Training samples and validation, `outpaint`, `infer`, `evaluate`, the ahead-of-time compiler and the configs
all read these fields under these names (a config's `sampler` section holds exactly them). Defaults are the
official pipeline's values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from m3ddm_jax.diffusion import NoiseSchedule, make_sampler
from m3ddm_jax.models.attention import NAMES as ATTENTION_NAMES

SCHEDULERS = ("pndm", "ddim")
CANVAS_MODES = ("official", "native")
DTYPES = ("auto", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    steps: int = 50  # denoising steps per window
    scheduler: str = "pndm"  # pndm (the official loop, quirk included) | ddim
    # 1: start from noise, as officially; s < 1: start partway, from the TELEA-inpainted init noised to the
    # last floor(s * steps) timesteps, as img2img does (m3ddm_jax/diffusion/samplers.py)
    strength: float = 1.0
    guidance_scale: float = 2.0  # the masked-frame condition (official guidance_scale)
    global_guidance_scale: float = 4.0  # the global-frame condition (official previous_guidance_scale); <= 1: 2-way
    exact_branches: bool = False  # also evaluate the 4th branch the official code computes and discards
    windows_per_call: int = 0  # most windows per sampler call; 0: 4 per local device
    # official: the official square canvas (<= 256 pixels), cropped to the ratio; native: a canvas shaped like
    # the ratio with long side canvas_size (a multiple of the model's size multiple), composited at the
    # source resolution.
    canvas_mode: str = "official"
    canvas_size: int = 256
    global_size: tuple[int, int] = (256, 256)  # (H, W) the global frames are resized to (official 256x256)
    dtype: str = "auto"  # UNet compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU) | float32 | bfloat16
    attention: str = "auto"  # attention kernel, a name of the kernel registry (auto: the backend's best)
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "global_size", tuple(int(s) for s in self.global_size))
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.scheduler in SCHEDULERS, f"scheduler={self.scheduler!r}; expected one of {SCHEDULERS}"),
            (0 < self.strength <= 1 and int(self.steps * self.strength) >= 1,
             f"strength must be in (0, 1] and keep at least one of the {self.steps} steps, got {self.strength}"),
            (self.windows_per_call >= 0, f"windows_per_call must be >= 0 (0: the default), got {self.windows_per_call}"),
            (self.canvas_mode in CANVAS_MODES, f"canvas_mode={self.canvas_mode!r}; expected one of {CANVAS_MODES}"),
            (self.canvas_size >= 1, f"canvas_size must be positive, got {self.canvas_size}"),
            (len(self.global_size) == 2 and min(self.global_size) >= 1,
             f"global_size must be (height, width), got {self.global_size}"),
            (self.dtype in DTYPES, f"dtype={self.dtype!r}; expected one of {DTYPES}"),
            (self.attention in ATTENTION_NAMES, f"attention={self.attention!r}; expected one of {ATTENTION_NAMES}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"sampler settings: {message}")

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> SamplerSettings:
        """From a config's `sampler` section (a ConfigDict or dict), which must hold exactly these fields: a
        missing or unknown key is an error naming it."""
        if section is None:
            raise ValueError("the config has no `sampler` section; add one with the fields "
                             f"{', '.join(FIELDS)} (see m3ddm_jax/sampling/settings.py)")
        values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
        missing, unknown = [n for n in FIELDS if n not in values], sorted(set(values) - set(FIELDS))
        if missing or unknown:
            raise ValueError("config section `sampler`: "
                             + "; ".join(f"{what} key(s) {', '.join(f'sampler.{k}' for k in keys)}"
                                         for what, keys in (("missing", missing), ("unknown", unknown)) if keys)
                             + f". It holds exactly the fields {', '.join(FIELDS)} (m3ddm_jax/sampling/settings.py)")
        return cls(**values)

    def check_steps(self, scheduler_config: Mapping[str, Any], label: str = "") -> None:
        """Fails fast, from a noise schedule's config (a weights folder's or a run's), on a step count the
        sampler cannot run; the error starts with `label`, the flag or config key that set the steps
        (default sampler.steps=N)."""
        try:
            make_sampler(self.scheduler, NoiseSchedule.from_config(dict(scheduler_config)), self.steps,
                         strength=self.strength)
        except ValueError as err:
            raise ValueError(f"{label or f'sampler.steps={self.steps}'}: {err}; use more steps or the ddim "
                             f"scheduler") from err

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> SamplerSettings:
        return dataclasses.replace(self, **changes)

    def compute_dtype(self, backend: str) -> str:
        """The UNet dtype on `backend` ('cpu', 'gpu', 'tpu'): 'auto' is float32 on CPU, where bfloat16 matmuls
        are emulated and slow, and bfloat16 elsewhere."""
        if self.dtype != "auto":
            return self.dtype
        return "float32" if backend == "cpu" else "bfloat16"

    def unet_overrides(self, backend: str) -> dict[str, str]:
        """The UNet config fields these settings choose on `backend` (pretrained.load_weights' overrides)."""
        return {"dtype": self.compute_dtype(backend), "attention_impl": self.attention}


FIELDS = tuple(f.name for f in dataclasses.fields(SamplerSettings))
