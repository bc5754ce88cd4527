"""Ahead-of-time compilation for TPU slices (m3ddm_jax/aot.py, tools/aot_compile.py), with libtpu on CPU.

Each compile of even a tiny train step costs the TPU compiler ~30 s of CPU (most of it the per-parameter
optimiser updates), so the model is shrunk further here (one plain UNet level) and every compile is used
for several checks.
"""

import importlib.util
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("libtpu", reason="the TPU compiler comes with the `tpu` extra")

from m3ddm_jax import aot, sharding  # noqa: E402
from m3ddm_jax.configlib import load_config  # noqa: E402
from m3ddm_jax.data import ArrayVideo, ClipConfig, DataConfig, write_latent_cache  # noqa: E402
from m3ddm_jax.data.pipeline import batch_spec, make_dataset  # noqa: E402
from m3ddm_jax.sampling.window import windows_per_call  # noqa: E402
from m3ddm_jax.training import trainer  # noqa: E402

from conftest import REPO  # noqa: E402

TOOL = str(REPO / "tools" / "aot_compile.py")
TINY = str(REPO / "configs" / "test_tiny.py")
# One plain UNet level: the smallest model of the real structure (global encoder, mid block, optimiser).
SMALL = ["--config.model.block_out_channels=(16,)", "--config.model.down_block_types=('DownBlockP3D',)",
         "--config.model.up_block_types=('UpBlockP3D',)"]
LIBTPU_NOISE = ("Failed to find host bounds", "unexpected worker hostname", "InitGoogle", "libtpu_init")


def run_tool(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, "--config", TINY, *SMALL, *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=900)


def check_report(report: dict) -> None:
    """The report's figures are consistent with each other and with the chip table."""
    b = report["per_device_bytes"]
    assert b["total"] == b["arguments"] + b["output"] - b["alias"] + b["temp"]
    assert b["alias"] > 0 if report["what"] == "train" else True  # the donated state comes back in place
    chip = aot.CHIPS[report["topology"].split(":")[0]]
    assert report["fits"] is True and b["total"] <= report["usable_hbm_bytes"] == chip.usable_hbm_bytes
    assert report["flops_per_device"] > 0 and report["model_flops_per_device"] > 0
    assert report["bytes_accessed_per_device"] > 0
    compute = max(report["flops_per_device"], report["model_flops_per_device"]) / chip.peak_flops
    memory = report["bytes_accessed_per_device"] / chip.hbm_bandwidth
    assert report["roofline_s"] == pytest.approx(max(compute, memory))
    assert report["mfu_ceiling"] == pytest.approx(report["model_flops_per_device"] / chip.peak_flops
                                                  / report["roofline_s"]) and report["mfu_ceiling"] <= 1


def test_batch_spec_is_what_the_pipeline_makes(tmp_path):
    """The abstract batch the train step is compiled for equals a real batch, from videos and from a cache."""
    clip = ClipConfig(num_frames=4, num_global_frames=2, size=(16, 24))
    frames = np.random.default_rng(0).integers(0, 256, (12, 20, 30, 3), np.uint8)
    video = DataConfig(clip=clip, per_host_batch_size=3)
    batch = next(iter(make_dataset(video, seed=0, source=[ArrayVideo(frames, 30.0)])))
    assert batch_spec(video, 3) == {k: (v.shape, v.dtype) for k, v in batch.items()}

    def encode(images):  # a codec of factor 4 with 5 channels
        n, h, w, _ = images.shape
        mean = np.repeat(images.reshape(n, h // 4, 4, w // 4, 4, 3).mean(axis=(2, 4))[..., :1], 5, axis=-1)
        return mean, np.abs(mean) + 0.1

    write_latent_cache(tmp_path / "cache", [ArrayVideo(frames, 30.0)], encode, clip=clip, seed=0)
    cached = DataConfig(clip=clip, per_host_batch_size=2, latent_cache=str(tmp_path / "cache"))
    batch = next(iter(make_dataset(cached, seed=0)))
    want = {k: (v.shape, v.dtype) for k, v in batch.items()}
    assert batch_spec(cached, 2, latent_channels=5, latent_factor=4) == want


def test_cli_train_step_on_v5e(tmp_path):
    """The tiny config's train step on v5e:2x4 (2 processes) with a data x fsdp mesh: report, JSON,
    executable, dumps, and nothing from libtpu on stderr. The config's global batch of 2 does not split over the 8
    chips and was not chosen on the command line: the tool compiles at 8 and says so."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = run_tool("--topology", "v5e:2x4", "--json", str(tmp_path / "r.json"), "--save", str(tmp_path / "step.aot"),
                   "--dump", str(tmp_path / "dump"), "--config.mesh.data=2", "--config.mesh.fsdp=4",
                   "--config.vae_frames_per_call=2", env=env)
    assert out.returncode == 0, out.stderr
    assert not [line for line in out.stderr.splitlines() if any(n in line for n in LIBTPU_NOISE)], out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    check_report(report)
    assert (report["chips"], report["processes"]) == (8, 2)
    assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and report["per_chip_batch"] == 1
    assert report["global_batch"] == 8 and any("global batch 2 does not split" in n for n in report["notes"])
    assert report["attention"] == "splash"  # the config's 'auto', resolved for TPU on a CPU host
    assert "fits            yes" in out.stdout and "v5e:2x4" in out.stdout

    with open(tmp_path / "step.aot", "rb") as f:
        saved = pickle.load(f)
    cfg = load_config(TINY)
    cfg.update_from_flattened_dict({"data.global_batch_size": 8, "mesh.data": 2, "mesh.fsdp": 4,
                                    "model.block_out_channels": (16,), "model.down_block_types": ("DownBlockP3D",),
                                    "model.up_block_types": ("UpBlockP3D",)})
    program = aot.train_program(cfg, aot.tpu_slice("v5e:2x4"))
    assert saved["format"] == "m3ddm_jax.aot" and len(saved["executable"]) > 0
    assert saved["in_tree"].num_leaves == len(jax.tree.leaves(program.args))

    # The dumps, attributed to the code (bench/aot_breakdown.py): the bytes it counts instruction by instruction
    # come near the compiler's own total, and the UNet's parts move bytes in both passes. Near, not equal: the
    # compiler counts a fusion's operands by the bytes its body reads (a slice of one, say), the tool whole;
    # at these shapes that is +24 % (the full-size step: BENCHMARKS.md).
    spec = importlib.util.spec_from_file_location("aot_breakdown", REPO / "bench" / "aot_breakdown.py")
    aot_breakdown = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(aot_breakdown)  # a script, not a package module: loaded from its file
    out = aot_breakdown.breakdown(str(tmp_path / "dump"), report)
    assert out["bytes_accessed_loop_bodies_once"] == pytest.approx(report["bytes_accessed_per_device"], rel=0.35)
    # The encoder's loop over frame chunks (2 frames of 4 per call) is counted as many times as it runs.
    assert out["loops"] == report["loops"] >= 1 and out["loops_counted_once"] == 0
    assert any(f"{report['loops']} loops in the compiled program" in n for n in report["notes"])
    assert out["bytes_accessed"] > out["bytes_accessed_loop_bodies_once"]
    moved = {(part, way) for part, way, _ in out["traffic"]}
    assert {("unet3d.ResnetBlockP3D.__call__", "forward"), ("unet3d.ResnetBlockP3D.__call__", "backward")} <= moved
    b = report["per_device_bytes"]
    assert 0 < out["peak_bytes"] <= b["arguments"] + b["temp"]


def sample_report(topology: str, per_call: int = 0) -> dict:
    cfg = load_config(TINY)
    cfg.sampler.windows_per_call = per_call
    tpu = aot.tpu_slice(topology)
    program = aot.sample_program(cfg, tpu)
    report = aot.compile_program(program, tpu)[1]
    check_report(report)
    local = sum(d.process_index == 0 for d in tpu.devices)  # the Outpainter runs on one host's chips
    assert report["devices_used"] == local and report["windows"] == windows_per_call(per_call, local)
    assert report["branches"] == 3 and report["steps"] == cfg.sampler.steps and report["processes"] == 2
    # The compiler counts the scan body once: its FLOPs and the analytic ones both cover one denoising step
    # on one device (at tiny shapes attention runs as XLA, which the compiler counts too).
    assert report["cost_unit"] == "denoising step"
    assert 0.8 <= report["flops_per_device"] / report["model_flops_per_device"] <= 2
    return report


def test_sampler_call_on_v5p():
    """The tiny config's window-sampler call on v5p:2x2x2 (a 3-D slice of 2 hosts): one host's 4 chips, one
    window per chip (the default 4 per chip costs the compiler 2.5x the time: test_sampler_call_on_v5e)."""
    report = sample_report("v5p:2x2x2", per_call=4)
    assert report["dtype"] == "bfloat16" and tuple(report["latent_hw"]) == (8, 8)
    assert windows_per_call(0, 4) == 16  # the default


@pytest.mark.slow
def test_sampler_call_on_v5e():
    assert sample_report("v5e:2x4")["windows"] == 16


@pytest.mark.slow
def test_train_step_on_v5p():
    cfg = load_config(TINY)
    cfg.update_from_flattened_dict({"data.global_batch_size": 16, "mesh.data": 4, "mesh.fsdp": 2})
    tpu = aot.tpu_slice("v5p:2x2x2")
    report = aot.compile_program(aot.train_program(cfg, tpu), tpu)[1]
    check_report(report)
    assert report["per_chip_batch"] == 2 and report["processes"] == 2


def test_oversized_batch_does_not_fit(tmp_path):
    """The paper config (no weights here: the released architecture) at 4096 clips per chip on v5e:2x4: its
    inputs alone exceed HBM. One message with the numbers and what to try, fits false, exit 3. (A plan the
    compiler refuses takes the same way: test_usable_hbm_is_what_the_compiler_allows.)"""
    out = subprocess.run([sys.executable, TOOL, "--config", str(REPO / "configs" / "m3ddm_sd15_256.py"),
                          "--topology", "v5e:2x4", "--config.data.global_batch_size=32768", "--json",
                          str(tmp_path / "r.json")], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 3, out.stderr
    assert "Traceback" not in out.stderr
    assert "train does not fit on v5e:2x4" in out.stderr and "GiB per device, a device has 15.75 GiB" in out.stderr
    assert "--config.mesh.fsdp" in out.stderr and "fits            NO" in out.stdout
    assert "the released M3DDM architecture is assumed" in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["fits"] is False and report["needed_bytes"] > report["usable_hbm_bytes"]
    assert report["needed_bytes"] == sum(report["argument_bytes"].values())


def test_bad_topology_or_config_is_named():
    with pytest.raises(aot.AotError, match="v9x:2x2"):
        aot.tpu_slice("v9x:2x2")
    with pytest.raises(aot.AotError, match="libtpu cannot describe topology 'v5e:3x3'"):
        aot.tpu_slice("v5e:3x3")
    out = run_tool("--topology", "v5e:2x4", "--config.data.global_batch_size=2")  # a chosen batch is not changed
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "does not split over the 8 batch shards" in out.stderr and "--config.data.global_batch_size=8" in out.stderr


@pytest.mark.parametrize("dies", [False, True], ids=["returns", "aborts"])
def test_held_back_libtpu_log_reaches_stderr_only_if_the_process_dies(tmp_path, dies):
    """libtpu aborts the process when a check of its own fails; the log held back during the compile is then
    the only account of why, so it must reach stderr. A block that ends normally keeps it back. Neither
    leaves a file behind."""
    code = textwrap.dedent(f"""
        import os
        from m3ddm_jax import aot
        with aot._captured_stderr() as log:
            os.write(2, b"Check failed: the reason\\n")
            if {dies}:
                os.abort()
            print(repr(log()))
        os.write(2, b"after the block\\n")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    if dies:
        assert proc.returncode == -signal.SIGABRT, proc.stderr
        assert "the process died while libtpu ran; libtpu wrote:\nCheck failed: the reason" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == repr("Check failed: the reason\n")
        assert "Check failed" not in proc.stderr and "died" not in proc.stderr and "after the block" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_global_batch_splits_over_batch_shards_and_processes():
    """A v5e:2x4 slice has 8 chips on 2 processes: each process loads half of the global batch; a global batch
    that does not split over the batch shards, or a mesh that puts the batch on fewer shards than processes,
    is refused with what to change."""
    devices = aot.tpu_slice("v5e:2x4").devices
    cfg = load_config(TINY)
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1}, devices)
    for size, per_host in ((8, 4), (24, 12)):
        cfg.data.global_batch_size = size
        assert trainer.per_host_batch_size(cfg, mesh) == per_host
    cfg.data.global_batch_size = 12
    with pytest.raises(ValueError, match=r"global_batch_size=12 does not split over the 8 batch shards .* "
                                         r"--config.data.global_batch_size=16\)"):
        trainer.per_host_batch_size(cfg, mesh)
    with pytest.raises(ValueError, match="split 1 ways .* each of its 2 processes"):
        trainer.per_host_batch_size(cfg, sharding.make_mesh({"tensor": -1}, devices))


def test_usable_hbm_is_what_the_compiler_allows():
    """The chip table's usable HBM per device is the limit in the compiler's out-of-memory message."""
    for generation, chip in aot.CHIPS.items():
        tpu = aot.tpu_slice(f"{generation}:2x2x1" if generation in ("v4", "v5p") else f"{generation}:2x2")
        devices = tpu.devices
        mesh = sharding.make_mesh({"data": -1}, devices)
        big = jax.ShapeDtypeStruct((len(devices), 2 * chip.hbm_bytes // 4), jnp.float32,
                                   sharding=sharding.batch_sharding(mesh, 2))
        program = aot.Program("train", jax.jit(lambda x: x * 2), (big,), lambda: 0, [], {})
        with pytest.raises(aot.DoesNotFit) as err:
            aot.compile_program(program, tpu)
        assert f"a device has {chip.usable_hbm_bytes / 2 ** 30:.2f} GiB" in str(err.value)
        assert err.value.report["fits"] is False and err.value.report["needed_bytes"] >= chip.hbm_bytes


def test_needed_bytes_of_a_refused_plan_count_its_arguments():
    """The compiler's out-of-memory figure ("the total memory required for HLO temporaries (X)") is the whole
    plan, arguments included: a program with arguments of 0.75 and temporaries of about 0.5 of a chip's HBM
    (two sorts of a 0.25 argument, which cannot fuse) is refused as needing more than its arguments, where its
    temporaries alone would be less."""
    tpu = aot.tpu_slice("v5e:2x2")
    usable = tpu.chip.usable_hbm_bytes
    one_chip = jax.sharding.SingleDeviceSharding(tpu.devices[0])
    x, y = (jax.ShapeDtypeStruct((int(f * usable) // 4096, 1024), jnp.float32, sharding=one_chip) for f in (0.5, 0.25))
    fn = jax.jit(lambda x, y: jnp.sort(jnp.sort(y, axis=0)[::-1] * 2, axis=1).sum(0) + x.sum(0))
    with pytest.raises(aot.DoesNotFit) as err:
        aot.compile_program(aot.Program("train", fn, (x, y), lambda: 0, [], {}), tpu)
    assert "the total memory required for HLO temporaries" in err.value.report["error"]
    assert err.value.report["needed_bytes"] > 0.75 * usable


def test_multislice_mesh_puts_data_over_slices():
    devices = aot.tpu_slice("v5e:2x2", num_slices=2).devices
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1}, devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert [{d.slice_index for d in row.ravel()} for row in mesh.devices] == [{0}, {1}]
    with pytest.raises(ValueError, match="mesh.data must be a multiple of 2"):
        sharding.make_mesh({"data": 1, "fsdp": -1}, devices)


def test_saved_executable_loads_and_runs(tmp_path):
    """save_executable / load_executable round trip (on the CPU: a TPU executable loads only on its slice)."""
    fn = jax.jit(lambda a, b: {"sum": a + b, "prod": a * b})
    x = jnp.arange(6.0).reshape(2, 3)
    aot.save_executable(fn.lower(x, x).compile(), str(tmp_path / "fn.aot"))
    assert os.listdir(tmp_path) == ["fn.aot"]  # written atomically: no temporary left
    out = aot.load_executable(str(tmp_path / "fn.aot"))(x, 2 * x)
    np.testing.assert_array_equal(out["sum"], 3 * x)
    np.testing.assert_array_equal(out["prod"], 2 * x * x)
    # One compiled for 2 of the session's simulated devices loads on those two.
    mesh = sharding.make_mesh({"data": 2}, jax.devices()[:2])
    split = jax.device_put(x, sharding.batch_sharding(mesh, 2))
    aot.save_executable(fn.lower(split, split).compile(), str(tmp_path / "fn2.aot"))
    out = aot.load_executable(str(tmp_path / "fn2.aot"))(split, 2 * split)
    np.testing.assert_array_equal(out["sum"], 3 * x)
    assert out["sum"].sharding.device_set == set(jax.devices()[:2])


def test_no_libtpu_noise_without_a_tpu():
    """With libtpu installed and no TPU attached, importing the package keeps JAX off libtpu (no init noise);
    plain JAX prints it, which shows this test can fail."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # other processes' libtpu lock would hide the noise
    code = "import jax; print(jax.devices())"
    ours = subprocess.run([sys.executable, "-c", "import m3ddm_jax; " + code], capture_output=True, text=True,
                          env=env, cwd=REPO)
    assert ours.returncode == 0 and "CpuDevice" in ours.stdout
    assert not any(n in ours.stderr for n in LIBTPU_NOISE), ours.stderr
    from m3ddm_jax import platforms
    if not platforms.accelerator_attached():
        plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
        assert any(n in plain.stderr for n in LIBTPU_NOISE), plain.stderr
