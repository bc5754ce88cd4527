"""Evaluation metrics for video outpainting: PSNR, SSIM ([0, 1], whole frame or a region mask), LPIPS
([-1, 1], AlexNet), and FVD (I3D features of 16-frame clips in [0, 1]). All per-frame metrics are jittable
and batched over any leading axes; the caller averages over frames and videos."""

from m3ddm_jax.metrics.fvd import (CLIP_FRAMES, FeatureStats, clip_indices, frechet_distance, i3d_inputs,
                                   video_features)
from m3ddm_jax.metrics.i3d import InceptionI3d
from m3ddm_jax.metrics.image import psnr, ssim
from m3ddm_jax.metrics.lpips import LPIPS
from m3ddm_jax.metrics.weights import load_i3d, load_lpips

__all__ = ["CLIP_FRAMES", "FeatureStats", "InceptionI3d", "LPIPS", "clip_indices", "frechet_distance", "i3d_inputs",
           "load_i3d", "load_lpips", "psnr", "ssim", "video_features"]
