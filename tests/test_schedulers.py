"""Noise schedule and samplers: parity with diffusers' PyTorch schedulers and with the official pipeline runs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_json

from m3ddm_jax.diffusion import DDIM, PNDM, NoiseSchedule, make_sampler

RUNS = load_json("pipeline_runs.json")
SHAPE = (2, 4, 3, 5)
# A config unlike the official one, so that every config field is exercised.
LINEAR_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "skip_prk_steps": True,
}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(params=["official", "linear"])
def config(request):
    if request.param == "linear":
        return LINEAR_CONFIG
    return json.loads((request.getfixturevalue("reference_dir") / "scheduler_config.json").read_text())


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def as_torch(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x))


def random_sequence(seed, n):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal((n,) + SHAPE).astype(np.float32)


def assert_steps_match(sampler, ref_sched, x, outputs):
    """Our sampler and a diffusers scheduler (timesteps already set) stepped on the same model outputs."""
    ref, ref_x = [], as_torch(x)
    for t, out in zip(ref_sched.timesteps, outputs):
        ref_x = ref_sched.step(as_torch(out), t, ref_x).prev_sample
        ref.append(ref_x.numpy())
    for i, (a, b) in enumerate(zip(run_ours(sampler, x, outputs), ref)):
        assert rel_err(a, b) < 1e-5, f"call {i}"


def run_ours(sampler, x, eps_seq, noise_seq=None):
    step = jax.jit(sampler.step)
    state, x, out = sampler.init_state(jnp.asarray(x)), jnp.asarray(x), []
    for i, eps in enumerate(eps_seq):
        extra = {} if noise_seq is None else {"noise": jnp.asarray(noise_seq[i])}
        state, x = step(state, x, jnp.asarray(eps), i, **extra)
        out.append(np.asarray(x))
    return out


def test_alphas_cumprod_match_diffusers_exactly(config, diffusers):
    ref = diffusers.DDPMScheduler.from_config(config).alphas_cumprod.numpy()
    np.testing.assert_array_equal(NoiseSchedule.from_config(config).alphas_cumprod, ref)


def test_add_noise_matches_diffusers_and_jits(config, diffusers):
    schedule = NoiseSchedule.from_config(config)
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2,) + SHAPE, np.float32)
    t = np.array([3, 977])
    ref = diffusers.DDPMScheduler.from_config(config).add_noise(as_torch(x0), as_torch(noise), as_torch(t)).numpy()
    ours = jax.jit(schedule.add_noise)(x0, noise, jnp.asarray(t))
    assert rel_err(ours, ref) < 1e-6
    assert rel_err(schedule.add_noise(x0[1:], noise[1:], 977), ref[1:]) < 1e-6  # a scalar t broadcasts
    np.testing.assert_array_equal(schedule.training_target(x0, noise, t), noise)


@pytest.mark.parametrize("steps", [10, 25, 50])
def test_pndm_sd_loop_matches_diffusers(config, diffusers, steps):
    ref_sched = diffusers.PNDMScheduler.from_config(config)
    ref_sched.set_timesteps(steps)
    sampler = PNDM.create(NoiseSchedule.from_config(config), steps, m3ddm_quirk=False)
    np.testing.assert_array_equal(sampler.timesteps, ref_sched.timesteps.numpy())
    assert_steps_match(sampler, ref_sched, *random_sequence(steps, len(sampler.timesteps)))


@pytest.mark.parametrize("steps", [10, 25, 50])
def test_pndm_m3ddm_loop_matches_diffusers_driven_like_the_official_pipeline(config, diffusers, steps):
    """README step 5: start at add_noise(x0, noise, timesteps[-steps]), loop over timesteps[1:]."""
    ref_sched = diffusers.PNDMScheduler.from_config(config)
    ref_sched.set_timesteps(steps)
    schedule = NoiseSchedule.from_config(config)
    sampler = PNDM.create(schedule, steps)
    np.testing.assert_array_equal(sampler.timesteps, ref_sched.timesteps[1:].numpy())
    assert sampler.start_timestep == int(ref_sched.timesteps[-steps])

    x0, eps_seq = random_sequence(100 + steps, steps + 1)
    noise, eps_seq = eps_seq[0], eps_seq[1:]
    ref_x = ref_sched.add_noise(as_torch(x0), as_torch(noise), ref_sched.timesteps[-steps : -steps + 1])
    start = schedule.add_noise(x0, noise, sampler.start_timestep)
    assert rel_err(start, ref_x.numpy()) < 1e-6
    ref = []
    for t, eps in zip(ref_sched.timesteps[1:], eps_seq):
        ref_x = ref_sched.step(as_torch(eps), t, ref_x).prev_sample
        ref.append(ref_x.numpy())
    for i, (a, b) in enumerate(zip(run_ours(sampler, np.asarray(start), eps_seq), ref)):
        assert rel_err(a, b) < 1e-5, f"call {i}"


@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers(config, diffusers, steps, eta):
    ref_sched = diffusers.DDIMScheduler.from_config(config, clip_sample=False)
    ref_sched.set_timesteps(steps)
    sampler = DDIM.create(NoiseSchedule.from_config(config), steps, eta=eta)
    np.testing.assert_array_equal(sampler.timesteps, ref_sched.timesteps.numpy())
    x, seq = random_sequence(200 + steps, 2 * steps)
    eps_seq, noise_seq = seq[:steps], seq[steps:]
    ref, ref_x = [], as_torch(x)
    for t, eps, noise in zip(ref_sched.timesteps, eps_seq, noise_seq):
        ref_x = ref_sched.step(as_torch(eps), t, ref_x, eta=eta, variance_noise=as_torch(noise)).prev_sample
        ref.append(ref_x.numpy())
    ours = run_ours(sampler, x, eps_seq, noise_seq if eta else None)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert rel_err(a, b) < 1e-5, f"call {i}"


@pytest.mark.parametrize(
    "kind, options",
    [("pndm", {"m3ddm_quirk": True}), ("pndm", {"m3ddm_quirk": False}), ("ddim", {}), ("ddim", {"eta": 1.0})],
)
def test_step_runs_in_jit_scan_with_traced_index(kind, options):
    sampler = make_sampler(kind, NoiseSchedule.from_config(LINEAR_CONFIG), 10, **options)
    x, eps_seq = random_sequence(7, len(sampler.timesteps))
    key = jax.random.key(0)

    @jax.jit
    def loop(x, eps_seq, key):
        def body(carry, inputs):  # carry (state, x), inputs (eps, i): step(state, x, eps, i)
            state, x = sampler.step(*carry, *inputs)
            return (state, x), x

        indices = jnp.arange(len(sampler.timesteps))
        return jax.lax.scan(body, (sampler.init_state(x, key), x), (eps_seq, indices))[1]

    scanned = np.asarray(loop(x, eps_seq, key))
    assert np.isfinite(scanned).all()
    if options.get("eta"):  # stochastic: same key, same result; another key, another result
        np.testing.assert_array_equal(scanned, np.asarray(loop(x, eps_seq, key)))
        assert np.abs(scanned - np.asarray(loop(x, eps_seq, jax.random.key(1)))).max() > 1e-3
    else:
        np.testing.assert_allclose(scanned, np.stack(run_ours(sampler, x, eps_seq)), rtol=1e-6, atol=1e-6)


@pytest.mark.reference
@pytest.mark.parametrize("run", sorted(RUNS["runs"]) if RUNS else [])
def test_official_pipeline_run_is_reproduced(reference_dir, run):
    """Feeding the recorded guided noise predictions to our M3DDM PNDM loop reproduces the recorded latents."""
    data = np.load(reference_dir / RUNS["runs"][run]["file"])
    schedule = NoiseSchedule.from_config(json.loads((reference_dir / RUNS["scheduler_config"]).read_text()))
    steps = int(data["num_inference_steps"])
    sampler = PNDM.create(schedule, steps)
    np.testing.assert_array_equal(schedule.alphas_cumprod, data["scheduler_alphas_cumprod"])
    sd_loop = PNDM.create(schedule, steps, m3ddm_quirk=False)
    np.testing.assert_array_equal(sd_loop.timesteps, data["scheduler_timesteps"])
    np.testing.assert_array_equal(sampler.timesteps, data["timesteps_used"])
    np.testing.assert_array_equal([sampler.start_timestep], data["add_noise_timestep"])

    start = schedule.add_noise(data["ori_latents"], data["rand_initial_noise"], sampler.start_timestep)
    assert rel_err(start, data["initial_latents"]) < 1e-6

    latents = run_ours(sampler, data["initial_latents"], data["guided_noise_pred_per_step"])
    for i, (ours, ref) in enumerate(zip(latents, data["latents_per_step"], strict=True)):
        assert rel_err(ours, ref) < 1e-5, f"step {i}"
    assert rel_err(latents[-1], data["out_latents"]) < 1e-5


# ------------------------------------------------------------ v-prediction, zero terminal SNR, trailing, strength

V_CONFIGS = {
    "v": {**LINEAR_CONFIG, "prediction_type": "v_prediction"},
    "v-zero-snr-trailing": {**LINEAR_CONFIG, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                            "beta_end": 0.012, "set_alpha_to_one": False, "prediction_type": "v_prediction",
                            "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
}


@pytest.fixture(params=sorted(V_CONFIGS))
def v_config(request):
    return V_CONFIGS[request.param]


def test_v_schedule_matches_diffusers(v_config, diffusers):
    """alphas_cumprod (zero-SNR rescaling included), the v target (get_velocity) and the implied noise."""
    schedule = NoiseSchedule.from_config(v_config)
    ref = diffusers.DDPMScheduler.from_config(v_config)
    np.testing.assert_allclose(schedule.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6, atol=1e-7)
    if v_config.get("rescale_betas_zero_snr"):
        assert schedule.alphas_cumprod[-1] == 0 and schedule.snr(len(schedule.alphas_cumprod) - 1) == 0
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal((2, 3) + SHAPE, np.float32)
    t = np.array([0, 500, 999])
    v = schedule.training_target(x0, noise, jnp.asarray(t))
    ref_v = ref.get_velocity(as_torch(x0), as_torch(noise), as_torch(t)).numpy()
    assert rel_err(v, ref_v) < 1e-5
    xt = schedule.add_noise(x0, noise, jnp.asarray(t))
    assert rel_err(schedule.predicted_noise(xt, v, jnp.asarray(t)), noise) < 1e-5


@pytest.mark.parametrize("steps", [10, 25])
def test_ddim_v_prediction_matches_diffusers(v_config, diffusers, steps):
    """Timesteps (leading or trailing spacing) and every step on a v prediction, from the zero-SNR t = T - 1."""
    ref_sched = diffusers.DDIMScheduler.from_config(v_config, clip_sample=False)
    ref_sched.set_timesteps(steps)
    sampler = DDIM.create(NoiseSchedule.from_config(v_config), steps)
    np.testing.assert_array_equal(sampler.timesteps, ref_sched.timesteps.numpy())
    assert_steps_match(sampler, ref_sched, *random_sequence(300 + steps, steps))


def test_trailing_timesteps_match_diffusers(diffusers):
    config = {**LINEAR_CONFIG, "timestep_spacing": "trailing"}
    schedule = NoiseSchedule.from_config(config)
    for steps in (1, 7, 25, 50, 1000):
        ref = diffusers.DDIMScheduler.from_config(config)
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(schedule.inference_timesteps(steps), ref.timesteps.numpy())


@pytest.mark.parametrize("kind", ["pndm", "ddim"])
@pytest.mark.parametrize("steps, strength", [(25, 0.6), (10, 0.35), (50, 0.999)])
def test_strength_keeps_img2img_timesteps(diffusers, kind, steps, strength):
    """strength s keeps the last floor(s n) inference timesteps (diffusers' img2img get_timesteps) and steps
    exactly as the full sampler does from there; s = 1 is the full sampler."""
    schedule = NoiseSchedule.from_config(LINEAR_CONFIG)
    full = make_sampler(kind, schedule, steps, m3ddm_quirk=False)
    np.testing.assert_array_equal(make_sampler(kind, schedule, steps, m3ddm_quirk=False, strength=1.0).timesteps,
                                  full.timesteps)
    ref = diffusers.DDIMScheduler.from_config(LINEAR_CONFIG)
    ref.set_timesteps(steps)
    keep = min(int(steps * strength), steps)
    expected = ref.timesteps[steps - keep:].numpy()
    part = make_sampler(kind, schedule, steps, m3ddm_quirk=False, strength=strength)
    if kind == "ddim":
        np.testing.assert_array_equal(part.timesteps, expected)
        x, eps_seq = random_sequence(7, len(full.timesteps))
        skip = len(full.timesteps) - len(part.timesteps)
        np.testing.assert_allclose(run_ours(part, x, eps_seq[skip:])[-1],
                                   run_ours(DDIM(*(f[skip:] for f in (full.timesteps, full.sample_coef, full.eps_coef,
                                                                    full.noise_std)), full.eta),
                                            x, eps_seq[skip:])[-1], rtol=1e-6)
    else:  # PNDM's list repeats its second timestep; the kept part starts at the img2img start
        assert part.start_timestep == expected[0] and part.timesteps[-1] == expected[-1]


@pytest.mark.parametrize("config, message", [
    ({**LINEAR_CONFIG, "rescale_betas_zero_snr": True}, "rescale_betas_zero_snr needs prediction_type 'v_prediction'"),
    ({**LINEAR_CONFIG, "prediction_type": "sample"}, "prediction_type 'sample' is not supported"),
    ({**LINEAR_CONFIG, "timestep_spacing": "linspace"}, "timestep_spacing 'linspace' is not supported"),
])
def test_bad_schedule_config_is_named(config, message):
    with pytest.raises(ValueError, match=message):
        NoiseSchedule.from_config(config)


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5, 0.01])
def test_bad_strength_is_named(strength):
    with pytest.raises(ValueError, match="strength"):
        make_sampler("ddim", NoiseSchedule.from_config(LINEAR_CONFIG), 25, strength=strength)
