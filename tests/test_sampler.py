"""The window sampler: parity with the official single-window runs (recorded draws replayed), the guidance
formulas, and the jitted loop against the same steps driven from Python."""

import json

import jax
import numpy as np
import pytest

from conftest import SMALL_UNET, load_json
from m3ddm_jax import pretrained
from m3ddm_jax.convert import m3ddm
from m3ddm_jax.convert.sources import open_state_dict
from m3ddm_jax.convert.vae import vae_from_torch
from m3ddm_jax.models.layers import random_init
from m3ddm_jax.models.vae import VAEConfig
from m3ddm_jax.sampling import Draws, Outpainter, WindowInputs, WindowSampler, combine, guidance_branches
from m3ddm_jax.sampling.settings import SamplerSettings
from m3ddm_jax.video import latent_mask

META = load_json("pipeline_runs.json") or {}
RUNS = META.get("runs", {})
LATENT_RTOL, IMAGE_ATOL = 1e-3, 1e-3


def nhwc(x):
    """(n, C, h, w) -> (n, h, w, C)."""
    return np.moveaxis(np.asarray(x), 1, -1)


def frames_last(x):
    """Official (C, F, H, W) (batch 1, "(b c) f h w") -> (F, H, W, C)."""
    return np.moveaxis(np.asarray(x), 0, -1)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def reference_models(reference_dir):
    unet = m3ddm.load_official(str(reference_dir / META["unet_weights"]), str(reference_dir / "config.json"))
    vae_config = VAEConfig.from_diffusers(json.loads((reference_dir / META["vae_config"]).read_text()))
    vae = vae_from_torch(open_state_dict(str(reference_dir / META["vae_weights"])), vae_config)
    return unet, vae, json.loads((reference_dir / META["scheduler_config"]).read_text())


def settings(d, exact=False):
    return dict(steps=int(d["num_inference_steps"]), guidance_scale=float(d["guidance_scale"]),
                global_guidance_scale=float(d["previous_guidance_scale"]), exact_branches=exact)


def outpainter_settings(d, exact=False) -> SamplerSettings:
    """The recorded run's settings, computed in float32 with the reference attention (parity, any backend)."""
    return SamplerSettings(**settings(d, exact), dtype="float32", attention="xla")


@pytest.mark.reference
@pytest.mark.parametrize("exact", [True, False], ids=["4branch", "3branch"])
@pytest.mark.parametrize("case", sorted(RUNS))
def test_single_window_matches_official(reference_models, reference_dir, case, exact):
    """Replaying the three recorded draws reproduces the official latents and images (float32)."""
    d = np.load(reference_dir / RUNS[case]["file"])
    unet, vae, scheduler_config = reference_models
    outpainter = Outpainter(unet, vae, scheduler_config, outpainter_settings(d, exact), devices=jax.devices()[:1])
    draws = Draws.replay(nhwc(d["rand_vae_posterior_eps_local"]), frames_last(d["rand_initial_noise"][0]),
                         nhwc(d["rand_vae_posterior_eps_global"]))
    latents, images = outpainter.outpaint_window(
        frames_last(d["ori_image"]), frames_last(d["mask_image"]), d["mask"][0, 0], nhwc(d["global_frames"]),
        float(d["fps"]), guide_latents=nhwc(d["already_outpainted_latents"][:, 0]), guide_flags=d["guide_flags"],
        draws=draws)
    latent_err = rel_err(latents, frames_last(d["out_latents"][0]))
    image_err = float(np.abs(images - d["out_images"][0]).max())
    print(f"{case} {'exact 4-branch' if exact else '3-branch'}: out_latents rel err {latent_err:.3g}, "
          f"out_images max abs {image_err:.3g}")
    assert latent_err <= LATENT_RTOL
    assert image_err <= IMAGE_ATOL


@pytest.mark.reference
@pytest.mark.parametrize("case", sorted(RUNS))
def test_step0_unet_input_matches_official(reference_models, reference_dir, case):
    """The first UNet input, branch-stacked in the official row order ([uu, cu, uc, cc] / [uu, cc] for one
    window), from latents rebuilt from the recorded posteriors: guides, masks and the black frame's latent
    land where the official code puts them. (The UNet call itself is checked in test_unet.py.)"""
    d = np.load(reference_dir / RUNS[case]["file"])
    unet, vae, scheduler_config = reference_models
    sampler = WindowSampler(unet, scheduler_config, **settings(d, exact=True))
    f = int(d["num_frames"])
    eps = nhwc(d["rand_vae_posterior_eps_local"])
    local = (nhwc(d["posterior_mean_local"]) + nhwc(d["posterior_std_local"]) * eps) * vae.config.scaling_factor
    mask = latent_mask(d["mask"][0, 0])[None, None, :, :, None]
    guides = nhwc(d["already_outpainted_latents"][:, 0])[None]
    tokens = np.zeros((1, 1, 320), np.float32)  # not part of the sample
    inputs = WindowInputs(local[None, :f], local[None, f:2 * f], mask, guides, d["guide_flags"][None],
                          local[None, None, 2 * f], np.array([float(d["fps"])]), tokens, tokens)
    sample, rows = sampler.unet_rows(inputs, frames_last(d["initial_latents"][0])[None])
    err = float(np.abs(sample - np.moveaxis(d["unet_step0_sample"], 1, -1)).max())
    print(f"{case} step 0: UNet input max abs diff {err:.3g}")
    assert err <= 1e-5
    np.testing.assert_array_equal(rows.fps, np.trunc(float(d["fps"])))


# --- guidance -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale, global_scale, exact, branches", [
    (2.0, 4.0, False, ("uu", "cu", "cc")),
    (2.0, 4.0, True, ("uu", "cu", "uc", "cc")),
    (2.0, 1.0, False, ("uu", "cc")),
    (2.0, 1.0, True, ("uu", "cc")),
    (1.0, 1.0, False, ("cc",)),
])
def test_guidance_branches_and_formulas(scale, global_scale, exact, branches):
    assert guidance_branches(scale, global_scale, exact) == branches
    rng = np.random.default_rng(0)
    eps = {b: rng.standard_normal((2, 3)).astype(np.float32) for b in ("uu", "cu", "uc", "cc")}
    used = {b: eps[b] for b in branches}
    uu, cu, cc = eps["uu"], eps["cu"], eps["cc"]
    want = {("uu", "cu", "cc"): uu + scale * (cu - uu) + global_scale * (cc - cu),
            ("uu", "cc"): uu + scale * (cc - uu),
            ("cc",): cc}[tuple(b for b in branches if b != "uc")]
    np.testing.assert_array_equal(combine(used, scale, global_scale), want)


# --- the jitted loop against the Python loop -------------------------------------------------------------

def random_window_inputs(rng, b=2, f=4, hw=(4, 4), tokens=6):
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    mask = np.ones((1, 1, *hw, 1), np.float32)
    mask[..., 1:-1, :] = 0
    flags = np.zeros((b, f), bool)
    flags[0, 0] = flags[1, -1] = True
    return WindowInputs(normal(b, f, *hw, 4), normal(b, f, *hw, 4), mask, normal(b, f, *hw, 4), flags,
                        normal(1, 1, *hw, 4), np.array([25.0, 5.0], np.float32), normal(1, tokens, 16),
                        normal(1, tokens, 16))


def test_scan_matches_python_loop():
    """The one-call scan and the host-driven loop (one jitted step per call) run the same steps; different
    windows of a batch get different inputs, and the key draws the noise."""
    unet = random_init(pretrained.abstract_model(SMALL_UNET))
    config = pretrained.SD15_SCHEDULER_CONFIG
    kw = dict(steps=3, scheduler="ddim", guidance_scale=2.0, global_guidance_scale=1.0)
    inputs = random_window_inputs(np.random.default_rng(0))
    key = jax.random.key(1)
    scanned = WindowSampler(unet, config, **kw)(inputs, key=key)
    looped = WindowSampler(unet, config, loop="python", **kw)(inputs, key=key)
    assert scanned.shape == (2, 4, 4, 4, 4) and np.isfinite(scanned).all()
    np.testing.assert_allclose(scanned, looped, rtol=1e-5, atol=1e-5)
    assert np.abs(scanned[0] - scanned[1]).max() > 1e-2
    with pytest.raises(ValueError, match="exactly one of noise and key"):
        WindowSampler(unet, config, **kw)(inputs)
