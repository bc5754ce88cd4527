"""Training: resume after kill -9, sharded == single-device, two processes (and their checkpoint exported on
one host), non-finite steps.

Whole runs go through `python -m m3ddm_jax.train` in subprocesses (kill -9 needs a process; the two-process
run needs two); the mesh check runs here, on the session's simulated devices (conftest). They share one
persistent compilation cache, so the same step is compiled once per session.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, flat, flat_params, free_port, run_ok, subprocess_env

CONFIG = str(REPO / "configs" / "test_tiny.py")
COMPARED = ("loss", "grad_norm", "learning_rate")


def train_cmd(workdir, compile_cache, *overrides):
    return [sys.executable, "-m", "m3ddm_jax.train", f"--config={CONFIG}", f"--workdir={workdir}",
            f"--config.compilation_cache={compile_cache}", *overrides]


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def finished_steps(workdir):
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


HELD_OUT = str(REPO / "assets" / "videos" / "stream_of_water.mp4")


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, compile_cache):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    run_ok(train_cmd(workdir, compile_cache, "--config.total_steps=10", f"--config.sample.videos=('{HELD_OUT}',)"),
        env=subprocess_env())
    return workdir


def test_uninterrupted_run_logs_checkpoints_and_samples(uninterrupted):
    """What a run leaves behind: a metrics line per step, the last checkpoints, TensorBoard, samples. (Whether
    training learns is test_overfit's question: ten steps of a tiny model cannot show it.)"""
    rows = metrics(uninterrupted)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert finished_steps(uninterrupted) == [6, 8, 10]  # keep_checkpoints = 3
    assert all(np.isfinite(r["loss"]) and r["skipped_steps"] == 0 for r in rows)
    assert os.listdir(os.path.join(uninterrupted, "tensorboard"))
    # The run ends with EMA outpaintings of the held-out clip: an mp4 with its frames and a frame grid.
    from m3ddm_jax.video.io import read_video

    folder = os.path.join(uninterrupted, "samples", "step_0000010")
    video = read_video(os.path.join(folder, "stream_of_water.mp4"))
    assert len(video.frames) == 4 and abs(video.frames.shape[2] / video.frames.shape[1] - 9 / 16) < 0.02
    assert os.path.getsize(os.path.join(folder, "grid.png")) > 0


def test_kill9_then_resume_equals_uninterrupted(tmp_path, compile_cache, uninterrupted):
    workdir = str(tmp_path / "run")
    cmd = train_cmd(workdir, compile_cache, "--config.total_steps=10")
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not finished_steps(workdir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = finished_steps(workdir)
    assert killed_at and killed_at[-1] < 10, f"the run was not interrupted mid-way (checkpoints {killed_at})"

    run_ok(cmd, env=subprocess_env())
    resumed, reference = metrics(workdir), metrics(uninterrupted)
    assert [r["step"] for r in resumed] == list(range(1, 11))  # lines past the restored step were replaced
    for got, want in zip(resumed, reference):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), (got["step"], key)


def test_sharded_step_equals_single_device_and_restores_on_another_mesh(compile_cache, tmp_path):
    """Two steps on a 2 x 2 data x FSDP mesh of 4 (simulated) devices equal them on one device; a checkpoint of the
    sharded state restores onto the one device."""
    from m3ddm_jax import sharding
    from m3ddm_jax.configlib import load_config
    from m3ddm_jax.data.pipeline import make_dataset
    from m3ddm_jax.training.checkpoint import Checkpointer, abstract_like
    from m3ddm_jax.training.trainer import build_trainer, data_config

    jax.config.update("jax_compilation_cache_dir", compile_cache)
    cfg = load_config(CONFIG)
    cfg.data.global_batch_size = 4  # splits over the 2 x 2 mesh
    it = iter(make_dataset(data_config(cfg, cfg.data.global_batch_size), seed=0))
    batches = [next(it) for _ in range(2)]
    trainers = {"single": build_trainer(cfg, sharding.make_mesh({"data": 1}, jax.devices()[:1])),
                "mesh": build_trainer(cfg, sharding.make_mesh({"data": 2, "fsdp": 2}, jax.devices()[:4]))}
    assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(trainers["mesh"].state_shardings.params))
    losses = {name: [float(t.step(dict(b))["loss"]) for b in batches] for name, t in trainers.items()}
    np.testing.assert_allclose(losses["mesh"], losses["single"], rtol=1e-5)
    params = {name: jax.tree.leaves(jax.device_get(t.state.params)) for name, t in trainers.items()}
    for a, b in zip(params["single"], params["mesh"]):
        np.testing.assert_allclose(a, b, atol=1e-5)

    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1, keep=1)
    ckpt.save(2, trainers["mesh"].state, None, {}, force=True)
    ckpt.wait()
    single = trainers["single"]
    restored = ckpt.restore(2, abstract_like(single.state, single.state_shardings))
    assert all(x.sharding.device_set == {jax.devices()[0]} for x in jax.tree.leaves(restored))
    for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(jax.device_get(trainers["mesh"].state))):
        np.testing.assert_array_equal(a, b)


def test_two_processes_one_checkpoint_exported_on_one_host(tmp_path, compile_cache, capsys):
    """Two hosts on 127.0.0.1 (gloo): each feeds its own data shard, process 0 writes metrics, one checkpoint.
    The checkpoint exports on this one process, without devices: the weights folder holds the run's EMA
    parameters, as a full restore of the checkpoint has them."""
    workdir = str(tmp_path / "run")
    port = free_port()
    procs = [subprocess.Popen(train_cmd(workdir, compile_cache, "--config.total_steps=4", "--config.mesh.data=2"),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=subprocess_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                      JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
    assert finished_steps(workdir) == [2, 4]
    assert [r["step"] for r in metrics(workdir)] == [1, 2, 3, 4]
    # Both data shards got checkpointed positions (grain writes one file per process).
    step_dir = os.path.join(workdir, "checkpoints", "4", "data")
    assert len([f for f in os.listdir(step_dir) if "process" in f]) == 2, os.listdir(step_dir)

    sys.path.insert(0, str(REPO / "tools"))
    import convert_checkpoint
    import orbax.checkpoint as ocp

    from m3ddm_jax import pretrained

    dst = tmp_path / "model"
    assert convert_checkpoint.main(["export", "--src", workdir, "--dst", str(dst)]) == 0, capsys.readouterr().err
    exported = flat_params(pretrained.load_weights(str(dst)).unet)
    path = os.path.join(workdir, "checkpoints", "4", "state")
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    everything = checkpointer.metadata(path).item_metadata.tree
    everything = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=everything, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), everything)))
    want = {**flat(everything["ema"]), **flat(everything["rest"])}
    assert exported.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    assert any(not np.array_equal(v, flat(everything["params"]).get(k, v)) for k, v in want.items())  # EMA != raw


def tiny_batch(rng, b=2, f=4, g=2, size=16):
    mask = np.zeros((b, size, size), np.uint8)
    mask[:, :, : size // 4] = 1  # left band, aligned to the latent cells
    return {"frames": rng.integers(0, 256, (b, f, size, size, 3), dtype=np.uint8),
            "global_frames": rng.integers(0, 256, (b, g, size, size, 3), dtype=np.uint8),
            "fps": np.full((b,), 8.0, np.float32), "mask": mask,
            "given": np.array([[True, False, False, True], [False] * 4]),
            "global_masked": np.array([[True, False], [False, True]]),
            "drop_local": np.array([False, True]), "drop_global": np.array([True, False])}


def test_cached_latents_give_the_same_inputs_as_pixels():
    """In the pixel latent space (no receptive field) masking in latent space is exact, so training from a
    latent cache must see exactly what training from frames sees."""
    import jax

    from m3ddm_jax.models.pixel_space import PixelSpace, PixelSpaceConfig
    from m3ddm_jax.training import objective
    from m3ddm_jax.video import to_model_range

    codec = PixelSpace(PixelSpaceConfig(factor=2))
    batch = tiny_batch(np.random.default_rng(0))
    cached = dict(batch)
    for key, name in (("frames", "latent"), ("global_frames", "global_latent")):
        x = to_model_range(cached.pop(key))
        mean, std = codec.encode(x.reshape(-1, *x.shape[2:]))
        cached[f"{name}_mean"] = mean.reshape(*x.shape[:2], *mean.shape[1:])
        cached[f"{name}_std"] = std.reshape(*x.shape[:2], *std.shape[1:])
    key = jax.random.key(0)
    a, b = objective.unet_inputs(codec, batch, key), objective.unet_inputs(codec, cached, key)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # Local dropout keeps the guide frames, as the sampler's unconditional branch does.
    assert float(a["mask"][1].min()) == 1.0 and float(a["mask"][0, 0].max()) == 0.0


def test_vae_frames_per_call_gives_the_inputs_of_one_call():
    """Encoding k frames of each clip per VAE call (the train step's memory knob) gives the UNet inputs of one
    call for all frames, posterior draws included; a k that does not divide a clip's frames is an error."""
    import jax

    from m3ddm_jax import pretrained
    from m3ddm_jax.models.layers import random_init
    from m3ddm_jax.models.vae import VAEConfig
    from m3ddm_jax.training import objective

    vae = random_init(pretrained.abstract_model(VAEConfig(block_out_channels=(8, 16), layers_per_block=1,
                                                          norm_num_groups=4)), seed=0)
    batch, key = tiny_batch(np.random.default_rng(0)), jax.random.key(0)
    whole = objective.unet_inputs(vae, batch, key)
    assert float(np.std(whole["x0"])) > 0.01  # a real encoder and real draws, not constants
    for k in (1, 2, 8):  # 8: more than a clip's 4 frames, so one call per clip
        chunked = objective.unet_inputs(vae, batch, key, frames_per_call=k)
        for name in whole:
            np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-5, atol=1e-5, err_msg=f"{name}, k={k}")
    with pytest.raises(ValueError, match="vae_frames_per_call=3 does not divide the 4 frames"):
        objective.unet_inputs(vae, batch, key, frames_per_call=3)


def test_nonfinite_step_is_skipped_and_counted(compile_cache):
    import jax

    from m3ddm_jax import sharding
    from m3ddm_jax.configlib import load_config
    from m3ddm_jax.training.trainer import build_trainer

    jax.config.update("jax_compilation_cache_dir", compile_cache)
    trainer = build_trainer(load_config(CONFIG), sharding.make_mesh({"data": 1}, jax.devices()[:1]))
    batch = tiny_batch(np.random.default_rng(1))
    before = jax.device_get(trainer.state.params)
    bad = dict(batch, fps=np.full((2,), np.nan, np.float32))
    metrics = jax.device_get(trainer.step(bad))
    assert not metrics["finite"] and int(trainer.state.skipped) == 1
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(trainer.state.params))):
        np.testing.assert_array_equal(x, y)
    assert jax.device_get(trainer.step(batch))["finite"]
    assert int(trainer.state.step) == 2


def test_ema_follows_diffusers_ema_model(compile_cache):
    """The EMA of the train step is diffusers' EMAModel (default schedule): the first update copies the
    trained parameters, later ones decay by min(ema_decay, (1 + n) / (10 + n)); ema_decay 0.2 caps the third."""
    import jax
    import torch
    from diffusers.training_utils import EMAModel

    from m3ddm_jax import sharding
    from m3ddm_jax.configlib import load_config
    from m3ddm_jax.training.trainer import build_trainer

    jax.config.update("jax_compilation_cache_dir", compile_cache)
    cfg = load_config(CONFIG)
    cfg.optim.ema_decay, cfg.optim.warmup_steps = 0.2, 0  # no warmup: the parameters move from the first step
    trainer = build_trainer(cfg, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
    names = sorted(flat(jax.device_get(trainer.state.params)))
    # requires_grad: EMAModel copies, rather than averages, parameters that take no gradient
    as_torch = lambda state: [torch.tensor(flat(state)[n], dtype=torch.float64, requires_grad=True) for n in names]
    reference = EMAModel(as_torch(jax.device_get(trainer.state.params)), decay=cfg.optim.ema_decay)
    for i in range(3):
        assert jax.device_get(trainer.step(tiny_batch(np.random.default_rng(i))))["finite"]
        reference.step(as_torch(jax.device_get(trainer.state.params)))
    ema = flat(jax.device_get(trainer.state.ema))
    assert reference.cur_decay_value == 0.2
    for name, want in zip(names, reference.shadow_params):
        np.testing.assert_allclose(ema[name], want.numpy(), rtol=1e-6, atol=1e-7, err_msg=name)


def delete_a_data_file(step_dir):
    """Deletes the largest array data file of a checkpoint's train state."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) if os.path.basename(d) == "d"
             for f in fs]
    os.remove(max(files, key=os.path.getsize))


def test_damaged_newest_checkpoints_fall_back_and_resume_equals_uninterrupted(tmp_path, compile_cache, uninterrupted):
    """Step 10 loses an array file, step 8 its pytree metadata: resume warns about both, starts from step 6
    and trains on exactly as the uninterrupted run did. The damaged steps are kept aside, out of the way of the
    new saves of steps 8 and 10 and of keep_checkpoints."""
    workdir = str(tmp_path / "run")
    shutil.copytree(uninterrupted, workdir)
    ckpts = os.path.join(workdir, "checkpoints")
    delete_a_data_file(os.path.join(ckpts, "10"))
    os.remove(os.path.join(ckpts, "8", "state", "_METADATA"))
    before = {s: sorted(os.listdir(os.path.join(ckpts, s, "state"))) for s in ("8", "10")}

    proc = run_ok(train_cmd(workdir, compile_cache, "--config.total_steps=10"), env=subprocess_env())
    for step in (10, 8):
        # Not anchored at a line start: orbax's asyncio thread may be printing a traceback of its own (closed event
        # loop) when the warning is written, and then the warning starts mid-line.
        assert re.search(rf"W\d{{4}} .*checkpoint step {step} .*cannot be restored", proc.stderr), proc.stderr[-4000:]
    assert "resumed from step 6" in proc.stderr
    assert finished_steps(workdir) == [6, 8, 10]
    for s in ("8", "10"):  # kept, untouched, as <step>.damaged
        assert sorted(os.listdir(os.path.join(ckpts, f"{s}.damaged", "state"))) == before[s]
    resumed, reference = metrics(workdir), metrics(uninterrupted)
    assert [r["step"] for r in resumed] == list(range(1, 11))
    for got, want in zip(resumed, reference):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), (got["step"], key)


def test_no_restorable_checkpoint_stops_with_a_clear_message(tmp_path, compile_cache, uninterrupted):
    workdir = str(tmp_path / "run")
    shutil.copytree(uninterrupted, workdir)
    ckpts = os.path.join(workdir, "checkpoints")
    for step in ("6", "8", "10"):
        delete_a_data_file(os.path.join(ckpts, step))
    proc = subprocess.run(train_cmd(workdir, compile_cache, "--config.total_steps=12"), capture_output=True,
                          text=True, timeout=600, cwd=REPO, env=subprocess_env())
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert re.search(r"error: no checkpoint of .*checkpoints restores: step 10 \(.*\); step 8 \(.*\); step 6 \(",
                     proc.stderr), proc.stderr[-4000:]
    # The run stops by that error, not by a crash of the entry point. (Orbax's asyncio thread sometimes prints a
    # traceback of its own about a closed event loop while the failed reads wind down: not ours to assert on.)
    assert 'm3ddm_jax/train.py", line' not in proc.stderr, proc.stderr[-4000:]
    assert sorted(os.listdir(ckpts)) == ["10", "6", "8"]  # nothing moved or deleted


def test_skipping_non_finite_steps_halts_after_too_many_in_a_row(tmp_path, compile_cache):
    """A learning rate of 1e6 blows the parameters up; skipped steps leave them so, so every later step is
    skipped too. nonfinite='skip' halts after max_consecutive_skips of them, with halt's message."""
    workdir = str(tmp_path / "run")
    proc = subprocess.run(train_cmd(workdir, compile_cache, "--config.optim.lr=1e6", "--config.max_consecutive_skips=3"),
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=subprocess_env())
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    match = re.search(r"error: 3 consecutive steps up to step (\d+) had a non-finite loss or gradient \((\d+) in "
                      r"all; they were not applied\)", proc.stderr)
    assert match, proc.stderr[-4000:]
    rows = metrics(workdir)
    skipped = [r["step"] for r in rows if not np.isfinite(r["loss"]) or not np.isfinite(r["grad_norm"])]
    assert skipped[-3:] == list(range(int(match[1]) - 2, int(match[1]) + 1))
    assert rows[-1]["step"] < 8  # it stopped before total_steps

    # With room for them, the run ends normally and its summary counts the skipped steps.
    workdir = str(tmp_path / "run2")
    proc = run_ok(train_cmd(workdir, compile_cache, "--config.optim.lr=1e6", "--config.max_consecutive_skips=100"),
               env=subprocess_env())
    skipped = metrics(workdir)[-1]["skipped_steps"]
    assert skipped > 3
    assert re.search(rf"(?m)^W\d{{4}} .*trained to step 8: {skipped} of 8 steps were skipped", proc.stderr), proc.stderr[-4000:]
