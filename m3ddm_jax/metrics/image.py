"""PSNR and SSIM on frames in [0, 1], per frame, over the whole frame or over a region mask.

Both take frames of shape (..., H, W, C) (any leading batch axes, e.g. (N, H, W, 3) or (B, F, H, W, 3)) and
return one value per frame, shape (...). Averaging over frames and videos is the caller's protocol.

Region: `mask=None` scores the whole frame. A mask of shape (H, W) or (..., H, W), 1 (True) on the pixels
to score, typically the generated (outpainted) region, scores only that region:
- PSNR: the MSE is taken over the mask pixels (all channels).
- SSIM: the SSIM map, defined on the valid crop (frame less (win - 1) / 2 pixels per side, as scikit-image
  crops), is averaged over the mask pixels inside that crop.
Fractional mask values act as weights. An all-zero mask gives NaN.

Everything is elementwise float32 (the Gaussian filter is a sum of shifted slices, not a convolution), so
the results do not depend on a backend's reduced-precision matmul or convolution defaults.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# scikit-image's structural_similarity(gaussian_weights=True): sigma 1.5, truncated at 3.5 sigma, a
# 2 * int(3.5 * 1.5 + 0.5) + 1 = 11-tap window; K1, K2 of Wang et al. 2004.
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(name: str, pred, target, mask) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Validates shapes (at trace time) and returns float32 frames and a float32 mask of shape pred[:-1]."""
    pred, target = jnp.asarray(pred), jnp.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"{name}: `pred` has shape {pred.shape} but `target` has {target.shape}; compare "
                         f"frames of the same size (resize or crop one of them first)")
    if pred.ndim < 3:
        raise ValueError(f"{name}: `pred` and `target` must be frames (..., H, W, C), got shape {pred.shape}")
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape[-2:] != pred.shape[-3:-1]:
            raise ValueError(f"{name}: `mask` has shape {mask.shape}, whose last two axes should be the frame "
                             f"size {pred.shape[-3:-1]}; give an (H, W) or (..., H, W) mask")
        try:
            mask = jnp.broadcast_to(mask, pred.shape[:-1])
        except ValueError:
            raise ValueError(f"{name}: `mask` of shape {mask.shape} does not broadcast to the frames' "
                             f"{pred.shape[:-1]}; give an (H, W) or (..., H, W) mask") from None
        mask = mask.astype(jnp.float32)
    return pred.astype(jnp.float32), target.astype(jnp.float32), mask


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean over the last two (spatial) axes, weighted by `mask` when given."""
    if mask is None:
        return jnp.mean(values, axis=(-2, -1))
    return jnp.sum(values * mask, axis=(-2, -1)) / jnp.sum(mask, axis=(-2, -1))


@jax.jit
def psnr(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None, *, data_range: float = 1.0):
    """Peak signal-to-noise ratio in dB per frame: 10 log10(data_range^2 / MSE); +inf for identical frames.

    Equals skimage.metrics.peak_signal_noise_ratio(target, pred, data_range=data_range) when `mask` is None.
    """
    pred, target, mask = _check_pair("psnr", pred, target, mask)
    mse = _masked_mean(jnp.mean(jnp.square(pred - target), axis=-1), mask)
    return 10.0 * jnp.log10(data_range ** 2 / mse)


def _gaussian_taps(sigma: float, truncate: float) -> np.ndarray:
    """scipy.ndimage's Gaussian kernel: radius int(truncate * sigma + 0.5), normalised to sum 1."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def _valid_filter(x: jax.Array, taps: np.ndarray) -> jax.Array:
    """Separable 'valid' correlation over axes -3 and -2 (H, W) of (..., H, W, K).

    Only the valid part is needed: scikit-image crops (win - 1) / 2 pixels per side of the SSIM map, which
    are exactly the pixels whose window reaches the border, so its border mode never matters.
    """
    n = len(taps)
    h, w = x.shape[-3] - n + 1, x.shape[-2] - n + 1
    x = sum(float(t) * x[..., i:i + h, :, :] for i, t in enumerate(taps))
    return sum(float(t) * x[..., :, i:i + w, :] for i, t in enumerate(taps))


@jax.jit
def ssim(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None, *, data_range: float = 1.0):
    """Structural similarity per frame, averaged over channels.

    Equals skimage.metrics.structural_similarity(target, pred, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range, channel_axis=-1) when `mask` is None.
    """
    pred, target, mask = _check_pair("ssim", pred, target, mask)
    taps = _gaussian_taps(SSIM_SIGMA, SSIM_TRUNCATE)
    if min(pred.shape[-3:-1]) < len(taps):
        raise ValueError(f"ssim: frames of size {pred.shape[-3:-1]} are smaller than the {len(taps)}x{len(taps)} "
                         f"Gaussian window")
    # Second moments of globally centred frames: variances and the covariance are shift-invariant, and
    # centring shrinks the float32 cancellation in E[x^2] - E[x]^2 (float64 in scikit-image).
    centre = jnp.mean(target, axis=(-3, -2), keepdims=True)
    x, y = target - centre, pred - centre
    c = x.shape[-1]
    moments = _valid_filter(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1), taps)
    ux, uy, uxx, uyy, uxy = (moments[..., i * c:(i + 1) * c] for i in range(5))
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    ux, uy = ux + centre, uy + centre
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    if mask is not None:
        pad = (len(taps) - 1) // 2
        mask = mask[..., pad:mask.shape[-2] - pad, pad:mask.shape[-1] - pad]
    return _masked_mean(jnp.mean(ssim_map, axis=-1), mask)
