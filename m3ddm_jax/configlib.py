"""Config files (ml_collections `get_config()` modules under configs/) loaded by path: what
`--config FILE` does, for configs built on another one and for tests."""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    path = os.fspath(path)
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
