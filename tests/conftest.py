"""Shared test fixtures: the official reference folder and small helpers."""

import json
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = REPO.parent / "shared" / "fixtures" / "m3ddm_reference"
VIDEOS = REPO.parent / "shared" / "data" / "videos"


def reference_path() -> pathlib.Path | None:
    """M3DDM_REFERENCE_DIR, else ../shared/fixtures/m3ddm_reference if it exists, else None."""
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
