"""Reading PyTorch checkpoints safely and lazily: safetensors first, pickles only without running code.

A `TensorSource` knows every key's shape and dtype up front and loads one tensor at a time as float32 numpy,
so a 2.6 GB fp16 pickle is memory-mapped rather than copied, and each tensor is converted and dropped in
turn. The dtypes let a conversion refuse non-float tensors (mapping.plan) instead of casting them.

`CheckpointReadError` is the one error for a weights file that cannot be read, whoever reads it: converter
sources here, weights folders (pretrained.py), metric weights (metrics/weights.py).
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from typing import Iterator, Mapping

import numpy as np


class CheckpointReadError(ValueError):
    """A checkpoint or weights file cannot be read (truncated, corrupt, unsafe, or of an unknown format)."""


DAMAGED_FIX = ("The file may be truncated or corrupt: check the path, then download it again (or, for a folder "
               "written by tools/convert_checkpoint.py, convert it again).")


def damaged(path: str, problem: str) -> CheckpointReadError:
    """The error for a damaged file: names it, what is wrong and what to do."""
    return CheckpointReadError(f"{path}: {problem}. {DAMAGED_FIX}")


def dtype_name(dtype) -> str:
    """numpy / torch dtypes and safetensors' codes ('F16', 'BF16', 'I8') -> 'float16', 'bfloat16', 'int8'."""
    name = str(dtype).removeprefix("torch.")
    code = re.fullmatch(r"(BF|F|I|U)(\d.*)", name)  # safetensors: F32, BF16, I8, U8, F8_E4M3; also BOOL
    if code:
        return {"BF": "bfloat", "F": "float", "I": "int", "U": "uint"}[code[1]] + code[2].lower()
    return name.lower()


class TensorSource(Mapping):
    """Read-only mapping key -> float32 numpy array, with `shapes` and `dtypes` (the stored ones, by name)
    known without loading any tensor."""

    def __init__(self, path: str, shapes: dict[str, tuple], getter, dtypes: dict[str, str]):
        self.path, self.shapes, self._get, self.dtypes = path, shapes, getter, dtypes

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.shapes:
            raise KeyError(key)
        return self._get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def renamed(self, original: Mapping[str, str]) -> "TensorSource":
        """The tensors `original` names (new key -> key here), under their new keys."""
        return TensorSource(self.path, {k: self.shapes[v] for k, v in original.items()},
                            lambda k: self._get(original[k]), {k: self.dtypes[v] for k, v in original.items()})

    def with_prefix(self, prefix: str) -> "TensorSource":
        """The sub-mapping of keys starting with `prefix`, with the prefix removed."""
        return self.renamed({k[len(prefix):]: k for k in self.shapes if k.startswith(prefix)})

    def without_prefix(self, prefix: str) -> "TensorSource":
        """The sub-mapping of keys not starting with `prefix`."""
        return self.renamed({k: k for k in self.shapes if not k.startswith(prefix)})


def as_source(tensors: Mapping, path: str = "") -> TensorSource:
    """`tensors` (a TensorSource, or a state dict in memory: name -> numpy array or torch tensor) as a
    TensorSource."""
    if isinstance(tensors, TensorSource):
        return tensors
    return TensorSource(path, {k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__,
                        {k: dtype_name(v.dtype) for k, v in tensors.items()})


def _open_safetensors(path: str) -> TensorSource:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(path, framework="numpy")
        slices = {k: handle.get_slice(k) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise damaged(path, f"not a readable safetensors file ({e})") from e

    def get(key):
        try:
            return np.asarray(handle.get_tensor(key), dtype=np.float32)
        except Exception as e:  # bfloat16 needs torch; the error names the fix
            if "bfloat16" in str(e) or "bf16" in str(e).lower():
                return _torch_to_numpy(_safetensors_torch(path, key))
            raise damaged(path, f"tensor {key!r} cannot be read ({e})") from e

    return TensorSource(path, {k: tuple(s.get_shape()) for k, s in slices.items()}, get,
                        {k: dtype_name(s.get_dtype()) for k, s in slices.items()})


def _safetensors_torch(path, key):
    from safetensors.torch import safe_open as torch_open

    with torch_open(path, framework="pt") as h:
        return h.get_tensor(key)


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    return t.detach().to(torch.float32).cpu().numpy()


def _open_pickle(path: str) -> TensorSource:
    try:
        import torch
    except ImportError as e:
        raise CheckpointReadError(f"{path}: reading a PyTorch pickle needs torch (pip install torch==2.13.0); "
                                  f"or convert the file to safetensors first") from e
    # weights_only=True is torch's restricted unpickler: tensors, containers and primitives only, never
    # arbitrary callables. mmap keeps the 2.6 GB released checkpoint on disk instead of in memory.
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise CheckpointReadError(
            f"{path}: refused to load this pickle because it asks to run code or build objects that are not "
            f"tensors (torch.load weights_only=True said: {str(e).splitlines()[0]}). Only load checkpoints from "
            f"sources you trust, and prefer safetensors.") from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise damaged(path, f"not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]  # Lightning / original SD .ckpt layout
    if not isinstance(sd, Mapping) or not all(hasattr(v, "shape") for v in sd.values()):
        raise CheckpointReadError(f"{path}: expected a state dict (name -> tensor), found {type(sd).__name__}")
    return TensorSource(path, {k: tuple(v.shape) for k, v in sd.items()}, lambda k: _torch_to_numpy(sd[k]),
                        {k: dtype_name(v.dtype) for k, v in sd.items()})


def open_state_dict(path: str) -> TensorSource:
    """Opens a .safetensors, .bin, .pt, .pth or .ckpt state dict, lazily."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        return _open_safetensors(path)
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        return _open_pickle(path)
    raise CheckpointReadError(f"{path}: unknown checkpoint format; expected .safetensors, .bin, .pt, .pth or .ckpt")


def find_weights(folder: str, stem: str = "diffusion_pytorch_model") -> str:
    """The weights file of a diffusers component folder, preferring safetensors over a pickle."""
    for name in (f"{stem}.safetensors", f"{stem}.bin", f"{stem}.fp16.safetensors", f"{stem}.fp16.bin"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{folder}: no {stem}.safetensors or {stem}.bin in this folder")
