"""Canvas geometry of video outpainting: where the source frame sits on the canvas the model fills, the mask
of what to generate, the TELEA init frames, the 16 global frames, and compositing back.

Pure numpy / OpenCV on channels-last RGB frames (N, H, W, 3) uint8, so the outpainting pipeline can call it
per frame batch. Two layouts:

* `official_layout`: the official `src/inference.py` geometry, reproduced exactly (square canvas of side
  <= 256, crops per target ratio after generation), including its failures, which raise ValueError here.
* `native_layout`: a canvas shaped like the target ratio (sides multiples of 64), composited back at the
  source resolution with the source pixels untouched.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import cv2
import numpy as np

OFFICIAL_CANVAS = 256  # the official square canvas side (and the training resolution)
LATENT_FACTOR = 8  # the VAE downsampling
MODEL_MULTIPLE = 64  # the SD-based UNet needs latent sides that are multiples of 8: pixel multiples of 64
NUM_GLOBAL_FRAMES = 16
GLOBAL_FRAME_HW = (256, 256)
TELEA_RADIUS = 5


class Box(NamedTuple):
    """A region [y0, y1) x [x0, x1) in pixels."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def hw(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0


def parse_ratio(text: str | float) -> float:
    """'9:16', '9/16' or '0.5625' -> width / height as a float (the official code divides the two numbers)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        try:
            num, den = (float(part) for part in re.split(r"[:/]", str(text)))
            value = num / den
        except (ValueError, ZeroDivisionError):
            value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"cannot parse aspect ratio {text!r}: write width:height (9:16), width/height (9/16) "
                         f"or a positive number (0.5625)")
    return value


def parse_ratios(text: str | Sequence[str | float]) -> list[float]:
    """The official comma-separated target list ('9:16,16:9') or a sequence of ratios -> floats."""
    items = text.split(",") if isinstance(text, str) else list(text)
    if not items:
        raise ValueError("no target aspect ratio given")
    return [parse_ratio(item) for item in items]


# ---------------------------------------------------------------------------------------------- official


def get_max_target_size(source_hw: tuple[int, int], ratios: Sequence[float]) -> tuple[int | float, int | float]:
    """The largest (height, width) any target ratio needs when the frame is extended (never shrunk).

    A side that grows becomes a float (height = W / r, width = H * r, as the official code computes it); an
    unchanged side stays an int. That type matters: the official canvas crashes on a float side <= 256.
    """
    h, w = source_hw
    max_h, max_w = h, w
    for r in ratios:
        if w / h > r:
            max_h = max(max_h, w / r)
        elif w / h < r:
            max_w = max(max_w, h * r)
    return max_h, max_w


@dataclass(frozen=True)
class Layout:
    """Where the resized source frame sits on the canvas. 1 = generate outside `box`."""

    source_hw: tuple[int, int]
    canvas_hw: tuple[int, int]
    box: Box
    interpolation: int  # cv2 flag for the source -> canvas resize

    @property
    def resized_hw(self) -> tuple[int, int]:
        return self.box.hw


@dataclass(frozen=True)
class OfficialLayout(Layout):
    max_target_size: tuple[int | float, int | float]
    ratios: tuple[float, ...]
    crops: tuple[Box, ...]  # one per ratio, in canvas pixels


@dataclass(frozen=True)
class NativeLayout(Layout):
    ratio: float
    output_hw: tuple[int, int]
    output_box: Box  # the source frame in the output, at scale 1


def official_layout(source_hw: tuple[int, int], ratios: str | Sequence[str | float]) -> OfficialLayout:
    """The official square-canvas geometry for a (H, W) frame and its target ratio list.

    Raises ValueError where the official code fails: the enlarged frame stays within 256 pixels but had to
    grow, so its side is a float that the official canvas allocation rejects.
    """
    h, w = _check_hw(source_hw)
    ratio_list = tuple(parse_ratios(ratios))
    max_h, max_w = get_max_target_size((h, w), ratio_list)
    # Python's max keeps the first of equal values; the official code compares height first.
    largest = max(max_h, max_w)
    if largest > OFFICIAL_CANVAS:
        side = OFFICIAL_CANVAS
    elif isinstance(largest, float):
        raise ValueError(
            f"official canvas: a {h}x{w} frame extended to ratios {ratios!r} needs a {largest:g}-pixel "
            f"canvas, below {OFFICIAL_CANVAS}; the official code fails on such inputs (non-integer canvas "
            f"size). Use the native canvas mode, or a frame whose extended size exceeds {OFFICIAL_CANVAS}.")
    else:
        side = largest
    # int() truncation of (side / largest) * size, as in the official resize call.
    rh, rw = int(side / largest * h), int(side / largest * w)
    y0, x0 = (side - rh) // 2, (side - rw) // 2
    crops = tuple(_official_crop(side, r) for r in ratio_list)
    return OfficialLayout(source_hw=(h, w), canvas_hw=(side, side), box=Box(y0, y0 + rh, x0, x0 + rw),
                          interpolation=cv2.INTER_LINEAR, max_target_size=(max_h, max_w), ratios=ratio_list,
                          crops=crops)


def _official_crop(side: int, ratio: float) -> Box:
    """The centred crop of the square canvas to `ratio` (truncated sizes and margins)."""
    if 1.0 > ratio:
        new = int(side * ratio)
        x0 = int((side - new) / 2)
        return Box(0, side, x0, x0 + new)
    new = int(side / ratio)
    y0 = int((side - new) / 2)
    return Box(y0, y0 + new, 0, side)


# ------------------------------------------------------------------------------------------------ native


def native_layout(source_hw: tuple[int, int], ratio: str | float, *, canvas_size: int = OFFICIAL_CANVAS,
                  multiple: int = MODEL_MULTIPLE) -> NativeLayout:
    """A canvas shaped like `ratio` for a (H, W) frame, and the output frame it is composited into.

    Output size rule: the smallest frame of the target ratio that holds the source at scale 1 (the source's
    side along the kept axis is kept, the other axis is extended), both sides even (H.264 yuv420p); the
    extended side is the nearest even number to the exact value, so the ratio holds within 1 pixel. The
    source sits centred in it, pixel for pixel.

    Canvas rule: long side `canvas_size` (a multiple of `multiple`; 256 is the training resolution),
    short side the nearest multiple of `multiple` (at least one) to the output's ratio. `multiple` is what
    the model needs (64 for the SD VAE and the released UNet: latent factor 8 x UNet factor 8). The canvas is
    the output frame resampled to that size, so its ratio may differ from the target by up to half a
    multiple of the short side (9:16 at 256 gives 256x128); the generated canvas is stretched back to the
    output size.
    """
    h, w = _check_hw(source_hw)
    r = parse_ratio(ratio)
    if canvas_size < multiple or canvas_size % multiple:
        raise ValueError(f"canvas_size={canvas_size} must be a positive multiple of {multiple}")
    if w / h > r:  # extend the height
        out_w = _even_up(w)
        out_h = max(_even_up(h), _even_nearest(out_w / r))
    else:  # extend the width
        out_h = _even_up(h)
        out_w = max(_even_up(w), _even_nearest(out_h * r))
    oy, ox = (out_h - h) // 2, (out_w - w) // 2
    if out_w >= out_h:
        cw, ch = canvas_size, _multiple_nearest(canvas_size * out_h / out_w, multiple)
    else:
        ch, cw = canvas_size, _multiple_nearest(canvas_size * out_w / out_h, multiple)
    sy, sx = ch / out_h, cw / out_w
    box = Box(round(oy * sy), round((oy + h) * sy), round(ox * sx), round((ox + w) * sx))
    if min(box.hw) < 1:
        raise ValueError(f"a {h}x{w} frame is too thin for a {ch}x{cw} canvas at ratio {ratio!r}")
    # INTER_AREA averages when shrinking (bilinear would alias); bilinear when enlarging small inputs.
    shrinking = box.hw[0] < h or box.hw[1] < w
    return NativeLayout(source_hw=(h, w), canvas_hw=(ch, cw), box=box,
                        interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR, ratio=r,
                        output_hw=(out_h, out_w), output_box=Box(oy, oy + h, ox, ox + w))


def _even_up(x: int) -> int:
    return x + x % 2


def _even_nearest(x: float) -> int:
    return 2 * round(x / 2)


def _multiple_nearest(x: float, multiple: int) -> int:
    return max(multiple, multiple * round(x / multiple))


def _check_hw(hw: tuple[int, int]) -> tuple[int, int]:
    h, w = (int(v) for v in hw)
    if h <= 0 or w <= 0:
        raise ValueError(f"frame size {hw} must be positive (height, width)")
    return h, w


# ---------------------------------------------------------------------------------------- canvas frames


@dataclass(frozen=True)
class CanvasFrames:
    masked: np.ndarray  # (N, Hc, Wc, 3) uint8: the resized source on black, the model's condition
    mask: np.ndarray  # (Hc, Wc) uint8, 1 = generate (outside the source), the same for every frame
    init: np.ndarray  # (N, Hc, Wc, 3) uint8: `masked` with the masked region TELEA-inpainted


def make_canvas(frames: np.ndarray, layout: Layout) -> CanvasFrames:
    """Source frames (N, H, W, 3) uint8 -> canvas frames, mask and TELEA init frames.

    The resize runs on float32 and the canvas assignment truncates to uint8, as the official code does.
    """
    frames = _check_frames(frames, layout.source_hw)
    ch, cw = layout.canvas_hw
    y0, y1, x0, x1 = layout.box
    mask = np.ones((ch, cw), np.uint8)
    mask[y0:y1, x0:x1] = 0
    masked = np.zeros((len(frames), ch, cw, 3), np.uint8)
    for i, frame in enumerate(frames):
        resized = cv2.resize(frame.astype(np.float32), (x1 - x0, y1 - y0), interpolation=layout.interpolation)
        masked[i, y0:y1, x0:x1] = resized
    return CanvasFrames(masked=masked, mask=mask, init=telea_fill(masked, mask))


def telea_fill(frames: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 frames with the region where `mask` (H, W) is non-zero filled by OpenCV's TELEA
    inpainting (radius TELEA_RADIUS) from the rest: the official init."""
    mask = np.asarray(mask).astype(np.uint8)
    return np.stack([cv2.inpaint(frame, mask, TELEA_RADIUS, cv2.INPAINT_TELEA) for frame in frames])


def to_model_range(images):
    """uint8 -> float32 in [-1, 1], as the official (x / 255 - 0.5) / 0.5, bit for bit on numpy arrays. JAX
    arrays too (the training objective calls it inside jit, where XLA may round x / 255 one float32 step
    apart); returns the same kind."""
    return (images.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Decoded images in [0, 1] -> uint8 with round(x * 255) (what diffusers' numpy_to_pil does)."""
    return np.round(np.clip(np.asarray(images, np.float32), 0, 1) * 255).astype(np.uint8)


def latent_mask(mask, factor: int = LATENT_FACTOR):
    """Pixel mask (..., H, W) -> latent mask (..., H/8, W/8) by nearest sampling: latent[i, j] = pixel[8i, 8j]
    (the top-left pixel of each block, so bands not aligned to 8 pixels become asymmetric, as officially).
    Numpy or JAX arrays, same dtype: 1 = generate, 0 = keep, as the pixel mask."""
    h, w = mask.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"mask size {h}x{w} is not a multiple of {factor}; the canvas sides must be "
                         f"multiples of {MODEL_MULTIPLE} for the UNet")
    return mask[..., ::factor, ::factor]


# ---------------------------------------------------------------------------------------- global frames


def global_frame_indices(num_frames: int, count: int = NUM_GLOBAL_FRAMES) -> np.ndarray:
    """The official choice: np.linspace(0, N - 1, count, dtype=int) (truncated, repeats when N < count)."""
    if num_frames < 1:
        raise ValueError("a video needs at least one frame for its global frames")
    return np.linspace(0, num_frames - 1, count, dtype=int)


def global_frames(frames: np.ndarray, count: int = NUM_GLOBAL_FRAMES,
                  size: tuple[int, int] = GLOBAL_FRAME_HW) -> np.ndarray:
    """Source frames (N, H, W, 3) uint8 -> (count, 256, 256, 3) float32 in [-1, 1]: the frames at
    `global_frame_indices`, x / 255, resized to `size` ignoring the aspect ratio with antialiased bilinear
    (torchvision's Resize(antialias=True) on a float tensor), then (x - 0.5) / 0.5."""
    picked = np.asarray(frames)[global_frame_indices(len(frames), count)]
    # Frame by frame: a float copy of 16 full-resolution frames at once would be large.
    resized = np.stack([resize_bilinear_antialias(frame.astype(np.float32) / np.float32(255), size)
                        for frame in picked])
    return (resized - np.float32(0.5)) / np.float32(0.5)


def resize_bilinear_antialias(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) float32 -> (h, w, C) float32, PyTorch's bilinear interpolate(antialias=True,
    align_corners=False): when shrinking, the triangle filter is widened by the scale (area-like averaging);
    when enlarging it is plain bilinear with edge clamping. Separable: width, then height."""
    image = np.asarray(image, np.float32)
    out = _resample_axis(image, size[1], axis=1)
    return _resample_axis(out, size[0], axis=0)


def _resample_axis(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    index, weight = _antialias_taps(x.shape[axis], n_out)
    taps = np.take(x, index, axis=axis)  # axis -> (n_out, taps)
    shape = [1] * taps.ndim
    shape[axis], shape[axis + 1] = weight.shape
    return (taps * weight.reshape(shape)).sum(axis=axis + 1, dtype=np.float32)


def _antialias_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and normalised float32 weights (n_out, taps) of PyTorch's antialiased linear filter."""
    scale = n_in / n_out
    support = max(scale, 1.0)  # the linear kernel's half-width 1, stretched when shrinking
    centre = scale * (np.arange(n_out) + 0.5)
    lo = np.maximum((centre - support + 0.5).astype(np.int64), 0)
    hi = np.minimum((centre + support + 0.5).astype(np.int64), n_in)
    offsets = np.arange(int(np.max(hi - lo)))
    index = lo[:, None] + offsets[None, :]
    weight = np.maximum(1.0 - np.abs((index - centre[:, None] + 0.5) / support), 0.0)
    weight = np.where(index < hi[:, None], weight, 0.0)
    weight /= weight.sum(axis=1, keepdims=True)
    return np.minimum(index, n_in - 1), weight.astype(np.float32)


# ------------------------------------------------------------------------------------------ compositing


def composite(generated: np.ndarray, canvas: CanvasFrames) -> np.ndarray:
    """The official final pixels: the black-padded source canvas where the mask is 0, generated where 1.
    `generated` (N, Hc, Wc, 3) uint8."""
    return np.where(canvas.mask[None, :, :, None].astype(bool), generated, canvas.masked)


def crop(frames: np.ndarray, box: Box) -> np.ndarray:
    """(N, H, W, C) -> the frames inside `box` (an official per-ratio crop, for one)."""
    return frames[:, box.y0:box.y1, box.x0:box.x1]


def composite_native(generated: np.ndarray, frames: np.ndarray, layout: NativeLayout) -> np.ndarray:
    """Generated canvas frames (N, Hc, Wc, 3) uint8 -> output frames (N, Ho, Wo, 3) uint8: the canvas
    resized to the output size (bicubic when enlarging, area when shrinking), then the source frames pasted
    unchanged into `layout.output_box`."""
    frames = _check_frames(frames, layout.source_hw)
    generated = _check_frames(generated, layout.canvas_hw, "generated canvas")
    if len(generated) != len(frames):
        raise ValueError(f"{len(generated)} generated frames for {len(frames)} source frames")
    out_h, out_w = layout.output_hw
    interpolation = cv2.INTER_CUBIC if out_h >= layout.canvas_hw[0] else cv2.INTER_AREA
    out = np.stack([cv2.resize(g, (out_w, out_h), interpolation=interpolation) for g in generated])
    y0, y1, x0, x1 = layout.output_box
    out[:, y0:y1, x0:x1] = frames
    return out


def _check_frames(frames: np.ndarray, hw: tuple[int, int], what: str = "source") -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{what} frames must be uint8 RGB (N, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1:3] != tuple(hw):
        raise ValueError(f"{what} frames of size {frames.shape[1:3]} do not match the layout's {what} size {hw}")
    return frames
