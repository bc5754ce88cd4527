"""The one way this package jits code that runs an NNX model.

A jitted function is a module-level function `fn(static, *arrays)`: `static` is a `Static`, the model's
nnx.GraphDef (or a tuple of GraphDefs and hashable settings), and the other arguments are the model's state
and the inputs; the function rebuilds the model with nnx.merge inside. `model_jit` jits such a function,
`split` gives a model's `Static` and state, and `Bound` binds a `Static` to a jitted function for callers
that pass arrays only (the train step). Why this idiom rather than nnx.jit or a closure over the GraphDef:

- compile cache: the structure is a static argument hashed once, so every caller with an equal structure
  and settings (each Outpainter, video and validation round) reuses one compiled function per input shape.
  A closure is a new function, with an empty cache, each time it is built.
- sharding control: state and inputs are plain pytrees, so in_shardings, out_shardings and donation are
  jax.jit's own, and `lower` on ShapeDtypeStructs compiles for a TPU slice ahead of time (m3ddm_jax/aot.py
  lowers the sampler call and the train step this way).
- retracing: a call retraces only for a new structure, static setting, or input shape, dtype or sharding;
  nnx.jit instead splits and re-merges the module graph on every call, on the host.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx


class Static:
    """A static jit argument hashed once. Hashing a model's GraphDef walks every node (~10 ms for the full
    UNet), which jit would otherwise repeat on every call."""

    __slots__ = ("value", "_hash")

    def __init__(self, value):
        self.value, self._hash = value, hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, Static) and self._hash == other._hash and self.value == other.value


def model_jit(fn=None, /, *, static_argnums: int | tuple[int, ...] = (), **jit_kwargs):
    """jax.jit of `fn(static: Static, *args)` with `static` (and any `static_argnums`) static; other
    keywords (in_shardings, out_shardings, donate_argnums, ...) go to jax.jit. Usable as a decorator."""
    if fn is None:
        return functools.partial(model_jit, static_argnums=static_argnums, **jit_kwargs)
    more = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)

    @functools.wraps(fn)
    def checked(static, *args, **kwargs):
        if not isinstance(static, Static):  # a bare GraphDef would be re-hashed on every call
            raise TypeError(f"{fn.__name__}: the first argument must be a jitting.Static, got {type(static)}")
        return fn(static, *args, **kwargs)

    return jax.jit(checked, static_argnums=(0, *more), **jit_kwargs)


def split(model: nnx.Module, *filters) -> tuple:
    """(Static(graphdef), *states) of `model`, as nnx.split(model, *filters)."""
    graphdef, *states = nnx.split(model, *filters)
    return (Static(graphdef), *states)


class Bound:
    """A model_jit function with its Static bound: called and lowered like a jitted function of the arrays."""

    def __init__(self, jitted, static: Static):
        self.jitted, self.static = jitted, static

    def __call__(self, *args, **kwargs):
        return self.jitted(self.static, *args, **kwargs)

    def lower(self, *args, **kwargs):
        return self.jitted.lower(self.static, *args, **kwargs)
