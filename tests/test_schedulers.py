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
    x, eps_seq = random_sequence(steps, len(sampler.timesteps))
    ref, ref_x = [], as_torch(x)
    for t, eps in zip(ref_sched.timesteps, eps_seq):
        ref_x = ref_sched.step(as_torch(eps), t, ref_x).prev_sample
        ref.append(ref_x.numpy())
    for i, (a, b) in enumerate(zip(run_ours(sampler, x, eps_seq), ref)):
        assert rel_err(a, b) < 1e-5, f"call {i}"


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
