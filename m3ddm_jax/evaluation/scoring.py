"""Scoring one video: per-frame PSNR / SSIM (whole frame and generated bands), LPIPS, and the I3D features of
its FVD clip, with the metric networks loaded once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3ddm_jax import jitting, metrics
from m3ddm_jax.evaluation.protocol import generated_mask


@jax.jit
def _image_scores(pred, target, mask):
    """uint8 frames (n, H, W, 3) -> per-frame PSNR / SSIM, whole frame and generated region."""
    p, t = pred.astype(jnp.float32) / 255, target.astype(jnp.float32) / 255
    return {"psnr": metrics.psnr(p, t), "ssim": metrics.ssim(p, t),
            "psnr_generated": metrics.psnr(p, t, mask), "ssim_generated": metrics.ssim(p, t, mask)}


@jitting.model_jit
def _lpips_scores(graphdef, state, pred, target):
    to_signed = lambda x: x.astype(jnp.float32) / 255 * 2 - 1
    return nnx.merge(graphdef.value, state)(to_signed(pred), to_signed(target))


class Scorer:
    """The metric networks (None when skipped) and the per-frame scoring of one video at one ratio."""

    def __init__(self, cfg):
        m = cfg.metrics
        self.batch = m.batch
        self.skipped = {}
        self.lpips = self.i3d = None
        if m.lpips_lin and m.alexnet:
            self.lpips = metrics.load_lpips(m.lpips_lin, m.alexnet)
        else:
            self.skipped["lpips"] = "no weight files (metrics.lpips_lin and metrics.alexnet are not both set)"
        if m.i3d:
            self.i3d = metrics.load_i3d(m.i3d)
        else:
            self.skipped["fvd"] = "no I3D weight file (metrics.i3d is empty)"

    def frame_scores(self, pred: np.ndarray, target: np.ndarray, band: int) -> dict[str, float]:
        """Mean over frames of each image metric."""
        scores = image_scores(pred, target, band, batch=self.batch)
        if self.lpips is not None:
            model = jitting.split(self.lpips)
            lpips = _chunked(lambda p, t: {"lpips": _lpips_scores(*model, p, t)}, pred, target, batch=self.batch)
            scores["lpips"] = float(np.mean(lpips["lpips"]))
        return scores

    def clip_features(self, frames: np.ndarray) -> list[float] | None:
        """I3D logits of the video's 16-frame FVD clip; None without I3D or for a shorter video."""
        if self.i3d is None or len(frames) < metrics.CLIP_FRAMES:
            return None
        clip = frames[metrics.clip_indices(len(frames))][None].astype(np.float32) / 255
        return np.asarray(metrics.video_features(self.i3d, clip))[0].tolist()


def image_scores(pred: np.ndarray, target: np.ndarray, band: int, *, batch: int = 8) -> dict[str, float]:
    """PSNR and SSIM of uint8 frames (n, H, W, 3), over the whole frame and over the generated bands of
    `band` pixels (`*_generated`), each the mean over frames."""
    mask = generated_mask(target.shape[1:3], band)
    scores = _chunked(lambda p, t: _image_scores(p, t, mask), pred, target, batch=batch)
    return {k: float(np.mean(v)) for k, v in scores.items()}


def _chunked(fn, pred: np.ndarray, target: np.ndarray, *, batch: int) -> dict[str, np.ndarray]:
    """fn over frames in chunks of `batch` (the last one zero-padded, so one shape compiles)."""
    out = {}
    for s in range(0, len(pred), batch):
        p, t = pred[s:s + batch], target[s:s + batch]
        pad = [(0, batch - len(p))] + [(0, 0)] * 3
        for k, v in fn(np.pad(p, pad), np.pad(t, pad)).items():
            out.setdefault(k, []).append(np.asarray(v)[:len(p)])
    return {k: np.concatenate(v) for k, v in out.items()}
