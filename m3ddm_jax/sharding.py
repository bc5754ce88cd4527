"""Mesh construction, the axis names and the logical-axis rules: the one place where sharding policy lives.

Model parameters carry logical axis names, the constants below, as `logical_axes` metadata (see
models/layers.py; the models import nothing else from here); activations are named here (BATCH). A rules
table maps each logical name to mesh axes, in the style of MaxDiffusion's `logical_axis_rules`. Data
parallel, FSDP and hybrids differ only by that table and the mesh shape. A dimension that does not divide
evenly over its mesh axes is replicated instead, so tiny test models run on any mesh; `log_unsplit` lists
those at start-up.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

# Logical axes: what a dimension of a parameter or an activation is.
BATCH = "batch"
EMBED = "embed"  # the width of a transformer's or an embedding's residual stream
MLP = "mlp"  # the hidden width of a feed-forward or embedding MLP
HEADS = "heads"  # attention heads x head width (queries, keys, values)
CONV_IN = "conv_in"  # input channels of a convolution or a 1x1 projection of feature maps
CONV_OUT = "conv_out"  # its output channels
NORM = "norm"  # channels of a normalisation's scale and bias
FRAMES = "frames"  # frames of a video

# Mesh axes.
DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)
WINDOWS = "windows"  # the Outpainter's 1-D mesh over window batches (parameters replicated, no rules)

# Default rules: the batch is split over every data-like axis; FSDP shards each kernel's input dimension
# (EMBED / CONV_IN); tensor parallelism (off unless the mesh has a TENSOR axis > 1) shards heads and
# the feed-forward width.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...] | str | None], ...] = (
    (BATCH, (DATA, FSDP)),
    (EMBED, FSDP),
    (CONV_IN, FSDP),
    (HEADS, TENSOR),
    (MLP, TENSOR),
    (CONV_OUT, None),
    (NORM, None),
    (FRAMES, None),
)


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
    """jax.distributed for a multi-host job, from the arguments or the JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID environment; a single process needs nothing. Call it before
    anything touches a JAX device."""
    num = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    if num <= 1:
        return
    # Cross-process collectives of the CPU backend (tests on 127.0.0.1); accelerators ignore it. Querying the
    # backend here would initialise it, which must not happen before jax.distributed.initialize.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address or os.environ["JAX_COORDINATOR_ADDRESS"], num_processes=num,
        process_id=process_id if process_id is not None else int(os.environ["JAX_PROCESS_ID"]))


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (global) devices with axes ('data', 'fsdp', 'tensor'). One size may be -1: it takes the
    remaining devices. Axes are Auto (the compiler propagates shardings), not Explicit. Devices of several
    TPU slices (multi-slice) put the data axis over the slices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {axis: int((shape or {}).get(axis, 1)) for axis in MESH_AXES}
    unknown = set(shape or {}) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"mesh {sizes}: at most one axis may be -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
        if len(devices) % known:
            raise ValueError(f"mesh {sizes}: {len(devices)} devices do not split by {known}")
        sizes = {a: (len(devices) // known if s == -1 else s) for a, s in sizes.items()}
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, but {len(devices)} are present")
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=axis_types, devices=devices)
    # Multi-slice: only the data axis crosses slices (over the slower data-center network); FSDP and tensor
    # collectives stay on each slice's interconnect.
    if sizes[DATA] % slices:
        raise ValueError(f"mesh {sizes} on {slices} slices: the data axis spans the slices, so mesh.data must be a "
                         f"multiple of {slices}")
    ici = (sizes[DATA] // slices, sizes[FSDP], sizes[TENSOR])
    grid = mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def _mesh_axes(name: str | None, rules: Mapping) -> tuple[str, ...]:
    if name is None:
        return ()
    target = rules.get(name)
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def _resolve(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Sequence) -> tuple[P, list[tuple[int, str, tuple[str, ...]]]]:
    """logical_to_spec's PartitionSpec, and (dimension, logical name, mesh axes dropped) for each dimension
    whose split did not divide it."""
    rules = dict(rules)
    used: set[str] = set()
    spec, undivided = [], []
    for dim, (name, size) in enumerate(zip(logical_axes, shape)):
        axes = [a for a in _mesh_axes(name, rules) if mesh.shape.get(a, 1) > 1 and a not in used]
        wanted = tuple(axes)
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            axes.pop()  # drop the innermost split until the rest divides
        if len(axes) < len(wanted):
            undivided.append((dim, name, wanted[len(axes):]))
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return P(*spec), undivided


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence = DEFAULT_RULES) -> P:
    """PartitionSpec for an array of `shape` whose dimensions carry `logical_axes`. Mesh axes of size 1,
    axes already used by an earlier dimension, and splits that do not divide the dimension are dropped."""
    return _resolve(logical_axes, shape, mesh, rules)[0]


def state_shardings(state, mesh: Mesh, rules: Sequence = DEFAULT_RULES):
    """NamedShardings for every array of a (possibly abstract) pytree of nnx Variables and arrays, in the
    same tree structure (each Variable holds its sharding), from the `logical_axes` metadata; arrays without
    metadata are replicated."""
    def one(x):
        if isinstance(x, nnx.Variable):
            axes = x.get_metadata().get("logical_axes")
            spec = logical_to_spec(axes, np.shape(x.get_value()), mesh, rules) if axes else P()
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def unsplit_parameters(state, mesh: Mesh, rules: Sequence = DEFAULT_RULES) -> list[str]:
    """One line per parameter of a (possibly abstract) pytree of nnx Variables that the rules ask to split
    over mesh axes that do not divide it (it is replicated along those axes instead): its path, shape, and
    each such dimension with its logical name and the mesh axes it is not split over."""
    lines = []
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    for path, x in flat:
        axes = x.get_metadata().get("logical_axes") if isinstance(x, nnx.Variable) else None
        if not axes:
            continue
        shape = np.shape(x.get_value())
        undivided = _resolve(axes, shape, mesh, rules)[1]
        if undivided:
            dims = ", ".join(f"dim {d} ({name}={shape[d]}) not over " + "x".join(f"{a}={mesh.shape[a]}" for a in axes)
                             for d, name, axes in undivided)
            lines.append(f"{jax.tree_util.keystr(path, simple=True, separator='/')} {tuple(shape)}: {dims}")
    return lines


def log_unsplit(state, mesh: Mesh, rules: Sequence = DEFAULT_RULES) -> None:
    """Logs (at start-up) which parameters of `state` are not split as the rules ask on `mesh`."""
    lines = unsplit_parameters(state, mesh, rules)
    if not lines:
        log.info("every parameter splits as the logical-axis rules ask on mesh %s", dict(mesh.shape))
        return
    log.info("%d parameters do not split as the logical-axis rules ask on mesh %s (a dimension does not divide "
             "over its mesh axes, so they are replicated along them):\n  %s", len(lines), dict(mesh.shape),
             "\n  ".join(lines))


def batch_axes(mesh: Mesh, rules: Sequence = DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split the batch."""
    return tuple(a for a in _mesh_axes(BATCH, dict(rules)) if mesh.shape.get(a, 1) > 1)


def batch_sharding(mesh: Mesh, ndim: int, rules: Sequence = DEFAULT_RULES) -> NamedSharding:
    """Sharding of an activation / data array whose leading dimension is the batch."""
    axes = batch_axes(mesh, rules)
    lead = axes if len(axes) > 1 else (axes[0] if axes else None)
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


class MeshBound:
    """A jitted function that is traced (at a call that compiles, or at `lower`) under `jax.set_mesh(mesh)`:
    kernels XLA cannot partition (Pallas splash attention) then run per shard over that mesh."""

    def __init__(self, jitted, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args, **kwargs)
