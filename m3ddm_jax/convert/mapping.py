"""PyTorch state dict <-> Flax NNX state: names, layouts and a complete consistency check.

Flax modules in this package are named after their PyTorch counterparts, so a Flax path
('down_blocks', 0, 'resnets', 1, 'norm1', 'scale') names the PyTorch tensor
'down_blocks.0.resnets.1.norm1.weight'. Where the two trees differ in shape (to_out is `to_out.0` in
PyTorch, GEGLU's Linear is `ff.net.0.proj`), a model family passes regex renames.

Layouts: PyTorch Linear (O, I) -> (I, O); ConvNd (O, I, *k) -> (*k, I, O), so a Conv3d onto a 3-D Flax conv
-> (kt, kh, kw, I, O); a Conv3d with a singleton time kernel onto a 2-D conv -> (kh, kw, I, O); a 1x1(x1)
conv -> a Linear. The same rule works on shapes alone (through zero-stride views), which lets a full-size
model be checked against a manifest without allocating it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping, Sequence

import numpy as np
from flax import nnx

# PyTorch buffers with no Flax counterpart (BatchNorm's step counter is unused in eval mode).
IGNORED_SUFFIXES = ("num_batches_tracked",)

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                  "var": "running_var"}

CONFIG_HINT = "Check that the config (config.json) belongs to these weights, and that the file is the right model."
# Stored dtypes a conversion reads (as float32); any other (int8, a quantised fp8, ...) is a mismatch, not a cast.
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class CheckpointMismatchError(ValueError):
    """A state dict does not match the model: lists every missing, unexpected, misshapen and non-floating-point
    tensor, then `hint`, the likely fix (by default: a config that does not belong to the weights)."""

    def __init__(self, what: str, missing: Sequence[str], unexpected: Sequence[str],
                 mismatched: Sequence[tuple[str, tuple, tuple]], hint: str = CONFIG_HINT,
                 not_float: Sequence[tuple[str, str]] = ()):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        self.not_float = list(not_float)
        counts = f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.mismatched)} with the wrong shape"
        lines = [f"{what}: the checkpoint does not match the model "
                 f"({counts}{f', {len(self.not_float)} not floating-point' if self.not_float else ''})."]
        show = lambda xs: ", ".join(map(str, xs[:20])) + (f", ... ({len(xs) - 20} more)" if len(xs) > 20 else "")
        if self.missing:
            lines.append(f"  missing keys: {show(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected keys: {show(self.unexpected)}")
        if self.mismatched:
            lines.append("  shape mismatches: " + show(
                [f"{k} (checkpoint {tuple(s)}, model expects {tuple(e)} in Flax layout)" for k, s, e in self.mismatched]))
        if self.not_float:
            lines.append(f"  not floating-point ({', '.join(FLOAT_DTYPES)} convert): "
                         + show([f"{k} ({d})" for k, d in self.not_float]))
        lines.append(f"  {hint}")
        super().__init__("\n".join(lines))


def torch_name(path: Sequence, renames: Iterable[tuple[str, str]] = ()) -> str:
    """Flax state path -> PyTorch state-dict key."""
    *prefix, leaf = [str(p) for p in path]
    name = ".".join(prefix + [_LEAF_TO_TORCH.get(leaf, leaf)])
    for pattern, repl in renames:
        name = re.sub(pattern, repl, name)
    return name


def to_flax_layout(x: np.ndarray, leaf: str, flax_ndim: int) -> np.ndarray:
    """Reorders one PyTorch tensor (or zero-stride view) into the Flax layout of leaf `leaf`."""
    if leaf != "kernel":
        return x
    if x.ndim == 5 and flax_ndim != 5:  # a Conv3d onto a 2-D conv / Linear: only singleton time kernels
        if x.shape[2] != 1:
            raise ValueError(f"Conv3d kernel {x.shape} has a time extent; no 2-D counterpart")
        x = x[:, :, 0]
    if x.ndim == 2:
        return x.T
    x = np.transpose(x, tuple(range(2, x.ndim)) + (1, 0))  # (O, I, *k) -> (*k, I, O)
    if flax_ndim == 2:  # 1x1 conv stored as a Linear
        if any(s != 1 for s in x.shape[:-2]):
            raise ValueError(f"kernel {x.shape} is not 1x1; cannot become a Linear")
        x = x.reshape(x.shape[-2:])
    return x


def _shape_view(shape: Sequence[int]) -> np.ndarray:
    return np.broadcast_to(np.zeros((), np.bool_), tuple(shape))


def flax_shape_of(torch_shape: Sequence[int], leaf: str, flax_ndim: int) -> tuple | None:
    """The Flax shape a PyTorch tensor of `torch_shape` converts to, or None if it cannot."""
    try:
        return tuple(to_flax_layout(_shape_view(torch_shape), leaf, flax_ndim).shape)
    except ValueError:
        return None


@dataclasses.dataclass
class Plan:
    """Where each PyTorch tensor goes: torch key -> (flax path, flax shape)."""
    targets: dict[str, tuple[tuple, tuple]]
    ignored: list[str]


def plan(flat_state: Iterable[tuple[tuple, object]], torch_shapes: Mapping[str, Sequence[int]], *, what: str,
         renames: Iterable[tuple[str, str]] = (), hint: str = CONFIG_HINT,
         torch_dtypes: Mapping[str, str] | None = None) -> Plan:
    """Matches a flat Flax state against PyTorch key -> shape (and, given `torch_dtypes`, key -> dtype name:
    only FLOAT_DTYPES convert). Raises CheckpointMismatchError listing every problem at once (ending with
    `hint`); returns the plan otherwise."""
    renames = list(renames)
    targets, missing, mismatched = {}, [], []
    for path, var in flat_state:
        name = torch_name(path, renames)
        shape = tuple(var.shape)
        if name in targets:
            raise AssertionError(f"two Flax parameters map to {name}: {targets[name][0]} and {path}")
        targets[name] = (tuple(path), shape)
        if name not in torch_shapes:
            missing.append(name)
            continue
        got = flax_shape_of(torch_shapes[name], str(path[-1]), len(shape))
        if got != shape:
            mismatched.append((name, tuple(torch_shapes[name]), shape))
    ignored = [k for k in torch_shapes if k not in targets and k.endswith(IGNORED_SUFFIXES)]
    unexpected = [k for k in torch_shapes if k not in targets and k not in ignored]
    not_float = sorted((k, torch_dtypes[k]) for k in targets
                       if torch_dtypes and k in torch_dtypes and torch_dtypes[k] not in FLOAT_DTYPES)
    if missing or unexpected or mismatched or not_float:
        raise CheckpointMismatchError(what, missing, unexpected, mismatched, hint, not_float)
    return Plan(targets, ignored)


def flax_state_from_torch(abstract_model: nnx.Module, source, *, what: str,
                          renames: Iterable[tuple[str, str]] = (), hint: str = CONFIG_HINT) -> nnx.State:
    """Fills the state of an abstract model (from `nnx.eval_shape`) from PyTorch tensors, one at a time.

    `source` is a sources.TensorSource (its `shapes` and `dtypes` are checked first); `source[name]` loads a
    single tensor, so a 1.3B-parameter checkpoint never exists twice in memory.
    """
    state = nnx.state(abstract_model)
    flat = nnx.to_flat_state(state)
    p = plan(flat, source.shapes, what=what, renames=renames, hint=hint, torch_dtypes=source.dtypes)
    by_path = {path: name for name, (path, _) in p.targets.items()}
    leaves = []
    for path, var in flat:
        x = np.asarray(source[by_path[tuple(path)]])
        x = to_flax_layout(x, str(path[-1]), len(var.shape))
        leaves.append((path, var.replace(np.ascontiguousarray(x, dtype=var.dtype))))
    return nnx.from_flat_state(leaves)
