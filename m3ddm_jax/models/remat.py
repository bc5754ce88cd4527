"""Rematerialisation (gradient checkpointing) of the UNet's blocks: the one table from a config's `remat` string to
what the backward pass keeps, and the one function that wraps a block.

It is part of the model (UNet3DConfig.remat; the UNet wraps every resnet and transformer), not of the training
loop: inference ignores it (no backward pass) and the Outpainter builds its UNet with NONE.
"""

from __future__ import annotations

import enum
from typing import Callable

import jax
from flax import nnx


class Remat(enum.StrEnum):
    """A config's `remat` value. A StrEnum: it equals, prints and serialises (JSON) as its string."""

    NONE = "none"  # no checkpoint: the backward pass reads every activation the forward pass stored
    FULL = "full"  # keep only each block's inputs; recompute everything inside it
    DOTS = "dots"  # keep matmul and conv outputs, except batched ones (attention scores); recompute the rest

    @classmethod
    def parse(cls, value: str) -> Remat:
        """The member named by `value` (a member or its string); ValueError naming the allowed values."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"remat={value!r} is not a rematerialisation policy; expected one of "
                             f"{[m.value for m in cls]}") from None

    @property
    def policy(self) -> Callable[..., bool] | None:
        """The jax.checkpoint policy (which intermediate values the backward pass may keep), or None for NONE,
        which applies no checkpoint at all."""
        return {Remat.NONE: None, Remat.FULL: jax.checkpoint_policies.nothing_saveable,
                Remat.DOTS: jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[self]

    def wrap(self, fn: Callable) -> Callable:
        """`fn(module, *args)`, rematerialised in the backward pass under this policy (`fn` itself for NONE)."""
        return fn if self is Remat.NONE else nnx.remat(fn, policy=self.policy)
