"""Masks and classifier-free-guidance dropout for the masked-frame training objective (numpy, drawn from a
`np.random.Generator`, so deterministic given the pipeline's per-example seed).

Per clip, with the default probabilities (all `MaskConfig` fields):

* One outpainting mask for every frame of the clip (1 = generate). Outpainted area ratio r ~ U(0.15, 0.75)
  of the frame, spread over the sides by direction:
  - one side (0.3): top, bottom, left or right (uniform); a band of round(r * extent) pixels, where extent
    is the frame height for top/bottom and the width for left/right;
  - two opposite sides (0.55): top+bottom or left+right (uniform); round(r * extent) pixels in all, the
    top/left band taking the floor half (as the official canvas centres the source, (side - size) // 2);
  - all four sides (0.15): a centred known rectangle scaled by sqrt(1 - r) on both axes (rounded), the
    margins split as for two sides; the masked area is then r of the frame.
  The masked fraction equals r up to the rounding to whole pixels. The latent mask follows the official
  nearest rule, latent[i, j] = pixel[8i, 8j] (`m3ddm_jax.video.canvas.latent_mask`).
* Guide frames ("given": mask 0, the conditioning latent is the real frame): none, every frame masked
  (0.30); the first and the last frame (0.35); each frame independently with p = 0.5 (0.35).
* Global frames that lie inside the clip's time span (between its first and last frame, stride gaps
  included) carry the clip's outpainting mask, given guide frames included: at inference global frames
  show only the source region, never generated content, and a given frame's pixels already reach the
  model through the local condition. `global_mask="all"` masks every global frame, "none" none.
* CFG dropout, independent flags: `drop_local` (0.35) replaces the local condition with the unconditional
  one (black-frame latents, all-ones mask), `drop_global` (0.1) replaces the global latents with zeros.
  The trainer applies both (m3ddm_jax.training.objective).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from m3ddm_jax.video.canvas import latent_mask

DIRECTIONS = ("one_side", "two_sides", "four_sides")
GUIDE_MODES = ("none", "first_last", "random")
GLOBAL_MASK_MODES = ("in_clip", "all", "none")
_ONE_SIDE = (("top",), ("bottom",), ("left",), ("right",))
_TWO_SIDES = (("top", "bottom"), ("left", "right"))


@dataclass(frozen=True)
class MaskConfig:
    ratio_range: tuple[float, float] = (0.15, 0.75)  # outpainted fraction of the frame area
    one_side_prob: float = 0.30
    two_sides_prob: float = 0.55
    four_sides_prob: float = 0.15
    no_guide_prob: float = 0.30  # every frame masked
    first_last_prob: float = 0.35  # first and last frames given
    random_guide_prob: float = 0.35  # each frame given with guide_frame_prob
    guide_frame_prob: float = 0.5
    global_mask: str = "in_clip"  # which global frames carry the clip's mask: in_clip | all | none
    drop_local_prob: float = 0.35
    drop_global_prob: float = 0.10

    def __post_init__(self):
        object.__setattr__(self, "ratio_range", tuple(self.ratio_range))
        lo, hi = self.ratio_range
        if not 0 <= lo <= hi < 1:
            raise ValueError(f"ratio_range must satisfy 0 <= low <= high < 1, got {self.ratio_range}")
        for name, probs in (("direction", self.direction_probs), ("guide mode", self.guide_probs)):
            if min(probs) < 0 or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
                raise ValueError(f"{name} probabilities must be non-negative and sum to 1, got {probs}")
        for name in ("guide_frame_prob", "drop_local_prob", "drop_global_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.global_mask not in GLOBAL_MASK_MODES:
            raise ValueError(f"global_mask must be one of {GLOBAL_MASK_MODES}, got {self.global_mask!r}")

    @property
    def direction_probs(self) -> tuple[float, float, float]:
        return self.one_side_prob, self.two_sides_prob, self.four_sides_prob

    @property
    def guide_probs(self) -> tuple[float, float, float]:
        return self.no_guide_prob, self.first_last_prob, self.random_guide_prob


@dataclass(frozen=True)
class Outpaint:
    direction: str  # one of DIRECTIONS
    sides: tuple[str, ...]  # the masked sides
    ratio: float  # the sampled area ratio
    margins: tuple[int, int, int, int]  # masked pixels at the top, bottom, left, right

    def mask(self, height: int, width: int) -> np.ndarray:
        """(H, W) uint8, 1 = generate."""
        top, bottom, left, right = self.margins
        mask = np.ones((height, width), np.uint8)
        mask[top:height - bottom, left:width - right] = 0
        return mask


def _split(total: int) -> tuple[int, int]:
    return total // 2, total - total // 2


def sample_outpaint(config: MaskConfig, rng: np.random.Generator, height: int, width: int) -> Outpaint:
    """Direction, sides, area ratio and pixel margins of one clip's outpainting mask."""
    direction = DIRECTIONS[rng.choice(3, p=config.direction_probs)]
    ratio = float(rng.uniform(*config.ratio_range))
    if direction == "four_sides":
        scale = math.sqrt(1.0 - ratio)
        top, bottom = _split(height - round(height * scale))
        left, right = _split(width - round(width * scale))
        return Outpaint(direction, ("top", "bottom", "left", "right"), ratio, (top, bottom, left, right))
    choices = _ONE_SIDE if direction == "one_side" else _TWO_SIDES
    sides = choices[rng.integers(len(choices))]
    extent = height if sides[0] in ("top", "bottom") else width
    total = round(ratio * extent)
    bands = dict(zip(sides, (total,) if len(sides) == 1 else _split(total)))
    margins = tuple(bands.get(side, 0) for side in ("top", "bottom", "left", "right"))
    return Outpaint(direction, sides, ratio, margins)


def sample_guides(config: MaskConfig, rng: np.random.Generator, num_frames: int) -> tuple[str, np.ndarray]:
    """The guide mode and the (num_frames,) bool flags of the given frames."""
    mode = GUIDE_MODES[rng.choice(3, p=config.guide_probs)]
    given = np.zeros(num_frames, bool)
    if mode == "first_last":
        given[[0, -1]] = True
    elif mode == "random":
        given = rng.random(num_frames) < config.guide_frame_prob
    return mode, given


def sample_masks(config: MaskConfig, rng: np.random.Generator, *, height: int, width: int, num_frames: int,
                 in_clip: np.ndarray) -> dict[str, np.ndarray]:
    """Everything the trainer needs to build the conditions of one clip:

    `mask` (H, W) uint8 and `latent_mask` (H/8, W/8) uint8, 1 = generate, shared by the clip's frames;
    `given` (F,) bool, guide frames (mask 0); `global_masked` (G,) bool, global frames that carry `mask`
    (from `in_clip`, the `global_in_clip` flags, and `config.global_mask`); `drop_local`, `drop_global`
    bool, the CFG dropout flags.
    """
    outpaint = sample_outpaint(config, rng, height, width)
    _, given = sample_guides(config, rng, num_frames)
    in_clip = np.asarray(in_clip, bool)
    global_masked = {"in_clip": in_clip, "all": np.ones_like(in_clip), "none": np.zeros_like(in_clip)}[
        config.global_mask]
    mask = outpaint.mask(height, width)
    return {
        "mask": mask,
        "latent_mask": np.ascontiguousarray(latent_mask(mask)),
        "given": given,
        "global_masked": global_masked,
        "drop_local": np.bool_(rng.random() < config.drop_local_prob),
        "drop_global": np.bool_(rng.random() < config.drop_global_prob),
    }


def global_in_clip(global_indices: np.ndarray, frame_indices: np.ndarray) -> np.ndarray:
    """(G,) bool: the global frames inside the clip's time span [first, last] (stride gaps included: a
    frame between two clip frames nearly shows them)."""
    return (global_indices >= frame_indices[0]) & (global_indices <= frame_indices[-1])
