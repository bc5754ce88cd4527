"""Config files (ml_collections `get_config()` modules under configs/): loaded by path (what `--config FILE`
does, for configs built on another one and for tests) and checked for the keys an entry point reads."""

from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import ml_collections


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    path = os.fspath(path)
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def require(cfg: ml_collections.ConfigDict, keys: Sequence[str], example: str) -> None:
    """Fails before any work, naming them, when some of the dotted `keys` ('optim.lr') are not in `cfg`:
    a config file written for another version fails at start-up, not when the run first reads the key."""
    missing = []
    for key in keys:
        node = cfg
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    if missing:
        raise ValueError(f"the config has no {', '.join(missing)}; add {'it' if len(missing) == 1 else 'them'} "
                         f"to the config file ({example} has every key)")
