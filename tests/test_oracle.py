"""Oracle checks of the sampling path and of the training objective.

The trained UNet is replaced by an oracle that knows the clean latents x0 and returns the exact target for
the x_t and t it is given (eps or v, the schedule's prediction type). The real outpainting path (canvas,
encode, hierarchical windows, guidance, sampler, decode, composite: what validation runs) must then give
back the ground truth in the generated bands, and the objective's loss of the oracle must be ~0. A wrong
sign, scale or timestep anywhere in either path breaks these (DESIGN: property tests).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3ddm_jax import evaluation, pretrained
from m3ddm_jax.diffusion.noise_schedule import NoiseSchedule
from m3ddm_jax.models.pixel_space import PixelSpace, PixelSpaceConfig
from m3ddm_jax.models.unet3d import UNet3DConfig
from m3ddm_jax.sampling import Outpainter, guidance_branches
from m3ddm_jax.sampling.settings import SamplerSettings
from m3ddm_jax.training import objective, validation
from m3ddm_jax.video.canvas import to_model_range

SD = pretrained.SD15_SCHEDULER_CONFIG
# The prediction type / schedule combinations the configs use: the paper's and the demo's.
SCHEDULES = {
    "epsilon": {**SD, "prediction_type": "epsilon"},
    "v_zero_snr_trailing": {**SD, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                            "timestep_spacing": "trailing"},
}


class Oracle(nnx.Module):
    """A stand-in UNet that knows the clean latents and predicts the exact target for its (x_t, t).

    `clean` is either the per-row clean latents (R, F, h, w, C) (the objective: row r is clip r), or a bank
    of frame latents (N, h, w, C) (the sampler): each frame of a window is the bank frame closest to the
    window's conditional row in its known region (mask 0: the kept source, or a guide frame). The sampler's
    rows are window-major with `branches` rows per window, the conditional one last; every branch of a
    window gets the same prediction, so any guidance leaves it unchanged. `bias` shifts the x0 the oracle
    believes in (a model that is slightly wrong). Its config only sets what the pipeline reads of a UNet's:
    the size multiple (2 levels: factor 2, the demo's) and the sampler's compute settings."""

    def __init__(self, schedule: NoiseSchedule, clean, *, branches: int = 1, bias: float = 0.0):
        self.config = UNet3DConfig(block_out_channels=(8, 8), down_block_types=("DownBlockP3D",) * 2,
                                   up_block_types=("UpBlockP3D",) * 2, attention_impl="auto")
        self.alphas = nnx.Variable(jnp.asarray(schedule.alphas_cumprod))
        self.clean = nnx.Variable(jnp.asarray(clean, jnp.float32))
        self.v = schedule.prediction_type == "v_prediction"
        self.branches, self.bias = branches, bias

    def encode_global(self, latents, rows):
        return jnp.zeros((rows, 1, 8), jnp.float32)

    def _x0(self, sample):
        clean, c, k = self.clean.get_value(), self.clean.shape[-1], self.branches
        if clean.ndim == 5:
            return jnp.repeat(clean, k, axis=0)
        rows = sample.reshape(-1, k, *sample.shape[1:])[:, -1]  # each window's conditional row
        known = 1.0 - rows[..., 2 * c:]
        diff = rows[:, :, None, ..., c:2 * c] - clean[None, None]  # (W, F, N, h, w, C)
        dist = jnp.sum(known[:, :, None] * jnp.square(diff), axis=(-3, -2, -1))
        return jnp.repeat(clean[jnp.argmin(dist, axis=-1)], k, axis=0)

    def __call__(self, sample, timesteps, fps, tokens):
        c = self.clean.shape[-1]
        xt, x0 = sample[..., :c], self._x0(sample) + self.bias
        a = jnp.broadcast_to(self.alphas.get_value()[jnp.asarray(timesteps).astype(jnp.int32)], sample.shape[:1])
        a = a.reshape(-1, 1, 1, 1, 1)
        eps = (xt - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
        return jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0 if self.v else eps


CODEC = PixelSpace(PixelSpaceConfig(factor=2))
HW, BAND = (16, 16), 4  # bands of 4 pixels: whole latent cells of the pixel space


def clip_frames(n: int, seed: int = 0) -> np.ndarray:
    """n distinct random frames: TELEA cannot guess the bands, only a model that knows them can."""
    return np.random.default_rng(seed).integers(0, 256, (n, *HW, 3), dtype=np.uint8)


def outpaint_oracle(frames, schedule_config, settings, *, bias=0.0, strides=None, oracle_cls=Oracle):
    """The band protocol of validation (evaluation.outpaint_bands) with an oracle UNet: result, band PSNR."""
    schedule = NoiseSchedule.from_config(schedule_config)
    k = len(guidance_branches(settings.guidance_scale, settings.global_guidance_scale, settings.exact_branches))
    clean = CODEC.encode_to_latents(jnp.asarray(to_model_range(frames)))
    outpainter = Outpainter(oracle_cls(schedule, clean, branches=k, bias=bias), CODEC, schedule_config,
                            settings, devices=jax.devices()[:1])
    h, w = HW
    out = outpainter.outpaint(frames[:, :, BAND:w - BAND], 25.0, w / h, key=0, strides=strides).frames
    return out, evaluation.image_scores(out, frames, BAND)["psnr_generated"]


def final_noise_psnr(schedule_config) -> float:
    """The PSNR left by the last step's target, alpha_bar = alphas_cumprod[0] (set_alpha_to_one False): noise of
    std sqrt(1 - alpha_bar) in [-1, 1] units."""
    assert not schedule_config.get("set_alpha_to_one")
    a0 = float(NoiseSchedule.from_config(schedule_config).alphas_cumprod[0])
    return -20 * np.log10(np.sqrt(1 - a0) / 2)


SETTINGS = SamplerSettings(steps=10, canvas_mode="native", canvas_size=HW[1], global_size=HW)


@pytest.mark.parametrize("scheduler", ["pndm", "ddim"])
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_oracle_outpainting_recovers_the_ground_truth(schedule, scheduler):
    """Hierarchical windows (two levels, guide frames), 3-branch guidance, the sampler, decode and composite:
    with an exact denoiser the generated bands are the ground truth up to the noise the last step keeps
    (what the schedule's final alpha_bar allows), far above the TELEA fill of the same bands."""
    frames = clip_frames(31)
    config = SCHEDULES[schedule]
    out, psnr = outpaint_oracle(frames, config, SETTINGS.replace(scheduler=scheduler), strides=(5, 1))
    telea = evaluation.image_scores(evaluation.telea_bands(frames, BAND), frames, BAND)["psnr_generated"]
    w = HW[1]
    np.testing.assert_array_equal(out[:, :, BAND:w - BAND], frames[:, :, BAND:w - BAND])
    assert psnr > final_noise_psnr(config) - 1.5 and psnr > telea + 15, (psnr, telea)


def test_oracle_with_strength_and_without_guidance():
    """Starting partway from the TELEA init (img2img) and sampling without guidance (1 branch) keep it exact."""
    config = SCHEDULES["v_zero_snr_trailing"]
    for settings in (SETTINGS.replace(strength=0.5), SETTINGS.replace(guidance_scale=1.0, global_guidance_scale=1.0)):
        _, psnr = outpaint_oracle(clip_frames(16), config, settings)
        assert psnr > final_noise_psnr(config) - 1.5, (settings, psnr)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_one_step_estimate_of_the_oracle_is_the_ground_truth(schedule):
    """Validation's one-step estimate (one DDIM step from the last training timestep, no guidance) of an exact
    denoiser is the ground truth, whatever the run's own timestep spacing."""
    config, settings = validation.estimate_sampler(SCHEDULES[schedule], SETTINGS)
    _, psnr = outpaint_oracle(clip_frames(16), config, settings)
    assert psnr > final_noise_psnr(config) - 1.5, psnr


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_biased_oracle_degrades_gracefully(schedule):
    """An oracle whose x0 is off by b everywhere gives bands off by b (b / 2 in [0, 1] units, on top of the
    noise the last step keeps): the sampler neither amplifies a model's error nor hides it."""
    frames, config = clip_frames(16), SCHEDULES[schedule]
    scores = [outpaint_oracle(frames, config, SETTINGS, bias=b)[1] for b in (0.0, 0.03, 0.1)]
    assert scores[0] > scores[1] > scores[2], scores
    for b, psnr in zip((0.03, 0.1), scores[1:]):
        expected = -10 * np.log10((b / 2) ** 2 + 10 ** (-final_noise_psnr(config) / 10))
        assert abs(psnr - expected) < 1.0, (b, psnr, expected)


def training_batch(frames, given=None, drop_local=False):
    """A batch of the objective's contract (m3ddm_jax/training/objective.py) for one clip with the band mask."""
    f = len(frames)
    return {"frames": frames[None], "global_frames": frames[None, :4], "fps": np.array([25.0], np.float32),
            "mask": evaluation.generated_mask(HW, BAND)[None].astype(np.float32),
            "given": np.zeros((1, f), bool) if given is None else given[None],
            "global_masked": np.zeros((1, 4), bool), "drop_local": np.array([drop_local]),
            "drop_global": np.array([False])}


class Zeros(Oracle):
    """A model that predicts zeros."""

    def __call__(self, sample, timesteps, fps, tokens):
        return jnp.zeros(sample.shape[:-1] + (self.clean.shape[-1],))


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_objective_of_the_oracle_is_zero(schedule):
    """The objective's loss (uniform and Min-SNR weighting, random timesteps) and the validation's noise error
    (mid-schedule and first timestep) of the exact prediction are 0; those of predicting zeros are not."""
    sched = NoiseSchedule.from_config(SCHEDULES[schedule])
    batch = jax.tree.map(lambda x: np.concatenate([x, x]), training_batch(clip_frames(8)))

    @jax.jit
    def losses(batch, key):
        inputs = objective.unet_inputs(CODEC, batch, key)
        t = jnp.asarray([sched.num_train_timesteps // 2, 0])
        noise = jax.random.normal(key, inputs["x0"].shape)
        out = []
        for model in (Oracle(sched, inputs["x0"]), Zeros(sched, inputs["x0"])):
            out.append(jnp.stack([objective.loss(model, sched, inputs, batch["fps"], jax.random.fold_in(key, i),
                                                 weighting=w)
                                  for w in objective.LOSS_WEIGHTINGS for i in range(3)]
                                 + list(objective.noise_error(model, sched, inputs, batch["fps"], t, noise))))
        return out

    exact, zero = (np.asarray(x) for x in losses(batch, jax.random.key(0)))
    assert (zero > 0.01).all() and (exact < 1e-6 * zero).all(), (exact, zero)


class Recorder(Oracle):
    """An oracle that also records the UNet input of its first call (every branch row)."""

    def __call__(self, sample, timesteps, fps, tokens):
        jax.debug.callback(lambda s: RECORDED.append(np.asarray(s)), sample)
        return super().__call__(sample, timesteps, fps, tokens)


RECORDED = []


def test_training_conditions_the_unet_as_sampling_does():
    """The local condition the objective trains on (masked latents | mask; CFG-dropped: black latent | ones)
    is the one the sampler's conditional and unconditional rows give the UNet, for the same clip and bands."""
    frames = clip_frames(16)
    RECORDED.clear()
    settings = SETTINGS.replace(guidance_scale=2.0, global_guidance_scale=1.0)  # rows: 'uu', 'cc'
    outpaint_oracle(frames, SCHEDULES["epsilon"], settings, oracle_cls=Recorder)
    c = CODEC.config.latent_channels
    uncond, cond = RECORDED[0][0, ..., c:], RECORDED[0][1, ..., c:]
    for drop, row in ((False, cond), (True, uncond)):
        batch = {k: jnp.asarray(v) for k, v in training_batch(frames, drop_local=drop).items()}
        inputs = objective.unet_inputs(CODEC, batch, jax.random.key(0))
        trained = np.concatenate([inputs["cond"][0], inputs["mask"][0]], axis=-1)
        np.testing.assert_allclose(trained, row, atol=1e-6, err_msg=f"drop_local={drop}")
