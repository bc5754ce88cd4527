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


def mux_sine(container, stream, rate: int, num_samples: int) -> None:
    """Encodes a 440 Hz mono sine of num_samples at `rate` into an open audio stream and flushes it."""
    t = np.arange(num_samples) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    for start in range(0, len(samples), 1024):
        chunk = av.AudioFrame.from_ndarray(samples[None, start:start + 1024], format="s16", layout="mono")
        chunk.sample_rate, chunk.pts, chunk.time_base = rate, start, Fraction(1, rate)
        container.mux(stream.encode(chunk))
    container.mux(stream.encode(None))
