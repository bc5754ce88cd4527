"""Fréchet video distance (Unterthiner et al. 2018): I3D features of 16-frame clips in [0, 1], a Gaussian
fit per set, and the Fréchet distance between the two fits.

A runner samples `clip_indices` from each video, calls the jitted `video_features` batch by batch, feeds
each set into a `FeatureStats`, and finally calls `frechet_distance(real_stats, fake_stats)`. FVD is a
distance between distributions of whole clips: there is no region variant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3ddm_jax import jitting
from m3ddm_jax.metrics.i3d import InceptionI3d

CLIP_FRAMES = 16
I3D_SIZE = (224, 224)


def clip_indices(num_frames: int, clip_frames: int = CLIP_FRAMES) -> np.ndarray:
    """`clip_frames` frame indices spread uniformly over a video, first and last frame included."""
    if num_frames < clip_frames:
        raise ValueError(f"fvd: a video of {num_frames} frames is shorter than a {clip_frames}-frame clip")
    return np.round(np.linspace(0, num_frames - 1, clip_frames)).astype(np.int64)


def i3d_inputs(clips: jax.Array) -> jax.Array:
    """Clips (B, T, H, W, 3) in [0, 1] -> I3D input: frames resized to 224x224 and mapped to [-1, 1].

    The resize is bilinear with half-pixel centres and no antialiasing, i.e. PyTorch's
    F.interpolate(mode='bilinear', align_corners=False), as the PyTorch FVD ports do.
    """
    if clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(f"fvd: `clips` must be RGB clips (B, T, H, W, 3), got shape {clips.shape}")
    b, t, _, _, c = clips.shape
    x = jax.image.resize(clips.astype(jnp.float32), (b, t, *I3D_SIZE, c), method="linear", antialias=False)
    return 2.0 * x - 1.0


def video_features(i3d: InceptionI3d, clips: jax.Array, *, layer: str = "logits") -> jax.Array:
    """Clips (B, T, H, W, 3) in [0, 1] -> I3D features (B, 400) ('logits', the default) or (B, 1024) ('pool')."""
    if layer not in ("logits", "pool"):
        raise ValueError(f"fvd: unknown I3D layer {layer!r}; choose 'logits' (400-d) or 'pool' (1024-d)")
    return _features(*jitting.split(i3d), clips, layer)


@jitting.model_jit(static_argnums=3)
def _features(graphdef, state, clips, layer):
    return nnx.merge(graphdef.value, state)(i3d_inputs(clips))[layer]


class FeatureStats:
    """Running mean and covariance (float64, unbiased as np.cov) of feature vectors, fed batch by batch."""

    def __init__(self):
        self.count = 0
        self._sum = self._outer = None

    def add(self, features) -> None:
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or (self._sum is not None and f.shape[1] != self._sum.shape[0]):
            want = "(N, D)" if self._sum is None else f"(N, {self._sum.shape[0]})"
            raise ValueError(f"fvd: features must be {want}, got shape {f.shape}")
        if self._sum is None:
            self._sum, self._outer = np.zeros(f.shape[1]), np.zeros((f.shape[1],) * 2)
        self.count += f.shape[0]
        self._sum += f.sum(axis=0)
        self._outer += f.T @ f

    @property
    def mean(self) -> np.ndarray:
        return self._sum / self.count

    @property
    def cov(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"fvd: a covariance needs at least 2 feature vectors, got {self.count}")
        mean = self.mean
        return (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)


def _stats(x, name: str) -> FeatureStats:
    if isinstance(x, FeatureStats):
        return x
    stats = FeatureStats()
    try:
        stats.add(x)
    except ValueError as e:
        raise ValueError(f"{e} (in `{name}`)") from None
    return stats


def frechet_distance(real: FeatureStats | np.ndarray, fake: FeatureStats | np.ndarray) -> float:
    """||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)) between Gaussian fits, in float64.

    `real` and `fake` are `FeatureStats` or (N, D) feature arrays. Tr((S_r S_f)^(1/2)) is computed as the
    sum of square roots of the eigenvalues of the symmetric PSD matrix S_r^(1/2) S_f S_r^(1/2), which has the
    same spectrum as S_r S_f; unlike a general sqrtm this stays real and stable when the covariances are
    singular (fewer clips than feature dimensions).
    """
    real, fake = _stats(real, "real"), _stats(fake, "fake")
    if real.mean.shape != fake.mean.shape:
        raise ValueError(f"fvd: `real` features have {real.mean.shape[0]} dimensions but `fake` have "
                         f"{fake.mean.shape[0]}; extract both with the same I3D layer")
    s1, s2 = real.cov, fake.cov
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    product = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((product + product.T) / 2)
    trace_sqrt = np.sum(np.sqrt(np.clip(eig, 0, None)))
    diff = real.mean - fake.mean
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)
