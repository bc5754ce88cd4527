"""Metric networks from weight files the user supplies (.pth/.pt/.bin through the restricted unpickler, or
.safetensors). Nothing is downloaded: the files come from the `lpips` package, torchvision and a
pytorch_i3d checkpoint.
"""

from __future__ import annotations

import os

from flax import nnx

from m3ddm_jax.convert.mapping import flax_state_from_torch
from m3ddm_jax.convert.sources import open_state_dict
from m3ddm_jax.metrics.i3d import InceptionI3d
from m3ddm_jax.metrics.lpips import ALEXNET_INDICES, LPIPS
from m3ddm_jax.models.layers import make_rngs

# Names inside LPIPS.lin (0.weight) and LPIPS.alexnet (convs.0.weight) -> the lpips package's head file
# (lin0.model.1.weight) and torchvision's AlexNet (features.0.weight, ...). Each rename is anchored on
# the Flax prefix, so none rewrites another's output.
LPIPS_HEAD_RENAMES = ((r"^(\d)\.weight$", r"lin\1.model.1.weight"),)
ALEXNET_RENAMES = tuple((rf"^convs\.{i}\.", f"features.{j}.") for i, j in enumerate(ALEXNET_INDICES))


def _fill(module: nnx.Module, path: str, role: str, *, renames=(), skip: tuple[str, ...] = ()) -> None:
    """Loads `path` into the abstract `module` in place; keys starting with `skip` are not used."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{role}: weight file {path} does not exist; give the path of the {role} file")
    source = open_state_dict(path)
    source = source.renamed({k: k for k in source.shapes if not k.startswith(skip)})
    nnx.update(module, flax_state_from_torch(module, source, what=f"{role}, {path}",
                                             renames=renames, hint=f"Check that {path} is the {role} file."))


def load_lpips(lin_path: str, alexnet_path: str) -> LPIPS:
    """LPIPS (AlexNet, v0.1) from the lpips package's head file (lpips/weights/v0.1/alex.pth: keys
    lin0.model.1.weight ... lin4.model.1.weight) and torchvision's AlexNet state dict (alexnet-owt-7be5be79.pth:
    features.*; its classifier.* is not used)."""
    model = nnx.eval_shape(lambda: LPIPS(rngs=make_rngs()))
    _fill(model.lin, lin_path, "LPIPS linear heads (lpips alex.pth)", renames=LPIPS_HEAD_RENAMES)
    _fill(model.alexnet, alexnet_path, "LPIPS AlexNet trunk (torchvision alexnet state dict)",
          renames=ALEXNET_RENAMES, skip=("classifier.",))
    return model


def load_i3d(path: str, num_classes: int = 400) -> InceptionI3d:
    """I3D from a pytorch_i3d InceptionI3d state dict (Conv3d_1a_7x7.conv3d.weight, ..., logits.conv3d.bias),
    e.g. the Kinetics-400 RGB checkpoint used for FVD."""
    model = nnx.eval_shape(lambda: InceptionI3d(num_classes, rngs=make_rngs()))
    _fill(model, path, "I3D (pytorch_i3d InceptionI3d state dict)")
    return model
