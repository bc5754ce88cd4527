"""Analytic FLOPs of a JAX function: 2 x multiply-adds of every matmul and convolution in its jaxpr.

Counting the traced program, rather than a hand formula per architecture, covers exactly what runs (the
guidance branches actually computed, the backward pass of a train step, remat recomputation) and stays
right when the model changes. Elementwise work (norms, softmax, activations) is left out, as MFU
conventions do.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
from jax.extend import core as jex_core


def _dot_general_flops(eqn) -> int:
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    batch = math.prod(lhs[d] for d in lb)
    contract = math.prod(lhs[d] for d in lc)
    lhs_free = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
    rhs_free = math.prod(s for d, s in enumerate(rhs) if d not in rc and d not in rb)
    return 2 * batch * contract * lhs_free * rhs_free


def _conv_flops(eqn) -> int:
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    kernel_in = rhs[dn.rhs_spec[1]]
    kernel_spatial = math.prod(rhs[d] for d in dn.rhs_spec[2:])
    return 2 * math.prod(out) * kernel_in * kernel_spatial


def jaxpr_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_general_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        mult = eqn.params.get("length", 1) if name == "scan" else 1
        for sub in jex_core.jaxprs_in_params(eqn.params):
            total += mult * jaxpr_flops(sub)
    return total


def count_flops(fn: Callable, *args, **kwargs) -> int:
    """FLOPs of one call of `fn(*args, **kwargs)` (arguments may be ShapeDtypeStructs)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)
