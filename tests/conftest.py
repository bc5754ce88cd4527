"""Shared test fixtures: the official reference folder and small helpers.

The project's shared folder (official-code fixtures, test clips) is M3DDM_SHARED_DIR, by default `shared/`
beside the checkout; .ci/run also finds it beside the checkout a clone was made from."""

import json
import os
import pathlib
from fractions import Fraction

import av
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("M3DDM_SHARED_DIR") or REPO.parent / "shared")
DEFAULT_REFERENCE = SHARED / "fixtures" / "m3ddm_reference"
VIDEOS = SHARED / "data" / "videos"


def reference_path() -> pathlib.Path | None:
    """M3DDM_REFERENCE_DIR, else SHARED/fixtures/m3ddm_reference if it exists, else None."""
    env = os.environ.get("M3DDM_REFERENCE_DIR")
    if env:
        return pathlib.Path(env)
    return DEFAULT_REFERENCE if DEFAULT_REFERENCE.is_dir() else None


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
    """The fixture folder. When M3DDM_REFERENCE_DIR is set, a missing folder fails the test instead of
    skipping it."""
    path = reference_path()
    if path is None:
        pytest.skip("no reference fixtures: set M3DDM_REFERENCE_DIR")
    if not path.is_dir():
        raise FileNotFoundError(f"M3DDM_REFERENCE_DIR={path} is not a directory")
    return path


def load_json(name: str):
    """Reads a JSON file of the reference folder at collection time (for parametrisation)."""
    path = reference_path()
    if path is None or not (path / name).is_file():
        if os.environ.get("M3DDM_REFERENCE_DIR"):
            raise FileNotFoundError(f"{path / name} is missing")
        return None
    return json.loads((path / name).read_text())


# Test subprocesses compile with LLVM at -O0: on CPU that halves the compile time of a UNet train step, which
# dominates their runs. Runs that a test compares with each other are compiled alike.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def subprocess_env(devices: int = 1, **extra) -> dict:
    """The environment of a JAX subprocess: the CPU backend with `devices` simulated devices, fast compiles."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    flags = FAST_COMPILE + (f" --xla_force_host_platform_device_count={devices}" if devices > 1 else "")
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> str:
    """One persistent compilation cache for the whole session, shared by xdist workers (JAX writes its cache
    entries atomically)."""
    path = tmp_path_factory.getbasetemp().parent / "jax_cache"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory, reference_dir) -> str:
    """The reference folder's tiny UNet and VAE, converted by the CLI into a weights folder (once a session)."""
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    import convert_checkpoint

    dst = tmp_path_factory.mktemp("tiny_weights") / "m3ddm_tiny"
    assert convert_checkpoint.main([
        "m3ddm", "--src", str(reference_dir / "unet_tiny.safetensors"), "--config", str(reference_dir / "config.json"),
        "--vae", str(reference_dir / "vae_tiny.safetensors"), "--vae-config", str(reference_dir / "vae_config.json"),
        "--dst", str(dst)]) == 0
    return str(dst)


def config_from_flags(path, *overrides: str):
    """A config file with `--config.key=value` overrides, parsed exactly as an entry point's --config flag
    parses them (types checked, the config locked)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["test", f"--config={path}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    values(argv)
    return values.config


def mux_sine(container, stream, rate: int, num_samples: int) -> None:
    """Encodes a 440 Hz mono sine of num_samples at `rate` into an open audio stream and flushes it."""
    t = np.arange(num_samples) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    for start in range(0, len(samples), 1024):
        chunk = av.AudioFrame.from_ndarray(samples[None, start:start + 1024], format="s16", layout="mono")
        chunk.sample_rate, chunk.pts, chunk.time_base = rate, start, Fraction(1, rate)
        container.mux(stream.encode(chunk))
    container.mux(stream.encode(None))
