"""Shared test fixtures: the official reference folder and small helpers.

The project's shared folder (official-code fixtures, test clips) is M3DDM_SHARED_DIR, by default `shared/`
beside the checkout; .ci/run also finds it beside the checkout a clone was made from."""

import json
import os
import pathlib
from fractions import Fraction

import av
import jax
import numpy as np
import pytest

# Tests and their subprocesses compile with LLVM at -O0: on CPU that halves the compile time of a UNet, which
# dominates most tests. Runs that a test compares with each other are compiled alike. Set before JAX starts.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

# Simulated CPU devices for the multi-device tests (jax.devices()[:n]), set once for the session: the count is
# fixed when JAX's backend starts. Code that defaults to all devices sees them too; subprocesses see one.
SIMULATED_DEVICES = 4
jax.config.update("jax_num_cpu_devices", SIMULATED_DEVICES)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("M3DDM_SHARED_DIR") or REPO.parent / "shared")
DEFAULT_REFERENCE = SHARED / "fixtures" / "m3ddm_reference"
VIDEOS = SHARED / "data" / "videos"


def reference_path() -> pathlib.Path | None:
    """M3DDM_REFERENCE_DIR, else SHARED/fixtures/m3ddm_reference if it exists, else None."""
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


def subprocess_env(**extra) -> dict:
    """The environment of a JAX subprocess: the CPU backend with one device, fast compiles."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE, "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> str:
    """One persistent compilation cache for the whole session, shared by xdist workers (JAX writes its cache
    entries atomically)."""
    path = tmp_path_factory.getbasetemp().parent / "jax_cache"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory, reference_dir) -> str:
    """The reference folder's tiny UNet and VAE, converted by the CLI into a weights folder (once a session)."""
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    import convert_checkpoint

    dst = tmp_path_factory.mktemp("tiny_weights") / "m3ddm_tiny"
    assert convert_checkpoint.main([
        "m3ddm", "--src", str(reference_dir / "unet_tiny.safetensors"), "--config", str(reference_dir / "config.json"),
        "--vae", str(reference_dir / "vae_tiny.safetensors"), "--vae-config", str(reference_dir / "vae_config.json"),
        "--dst", str(dst)]) == 0
    return str(dst)


def config_from_flags(path, *overrides: str):
    """A config file with `--config.key=value` overrides, parsed exactly as an entry point's --config flag
    parses them (types checked, the config locked)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["test", f"--config={path}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    values(argv)
    return values.config


def mux_sine(container, stream, rate: int, num_samples: int) -> None:
    """Encodes a 440 Hz mono sine of num_samples at `rate` into an open audio stream and flushes it."""
    t = np.arange(num_samples) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    for start in range(0, len(samples), 1024):
        chunk = av.AudioFrame.from_ndarray(samples[None, start:start + 1024], format="s16", layout="mono")
        chunk.sample_rate, chunk.pts, chunk.time_base = rate, start, Fraction(1, rate)
        container.mux(stream.encode(chunk))
    container.mux(stream.encode(None))


# ------------------------------------------------------------------------ helpers shared by test modules


def flat_params(model) -> dict:
    """An nnx model's parameters by their dotted paths ('conv_in.bias')."""
    import numpy as np
    from flax import nnx

    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def flat(tree) -> dict:
    """A state pytree's arrays by their parameter names ('conv_in.bias'), as flat_params names them."""
    import jax

    names = lambda path: [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return {".".join(n for n in names(p) if n != "value"): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _small_unet():
    from m3ddm_jax.models.unet3d import UNet3DConfig

    return UNet3DConfig(block_out_channels=(8, 8), down_block_types=("CrossAttnDownBlock3D", "DownBlockP3D"),
                        up_block_types=("UpBlockP3D", "CrossAttnUpBlock3D"), attention_heads=2, norm_num_groups=4,
                        cross_attention_dim=16, temporal_position_dim=8)


# A two-level UNet: loop, I/O and export logic do not need depth, and it compiles fast.
SMALL_UNET = _small_unet()


def load_config(name="eval_tiny", **overrides):
    """configs/<name>.py with dotted-key overrides ("metrics.i3d": path)."""
    from m3ddm_jax import configlib

    cfg = configlib.load_config(REPO / "configs" / f"{name}.py")
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a jax.distributed coordinator."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ok(cmd, timeout=600, **kw):
    """Runs a command from the checkout root and asserts it succeeded (its stderr's tail on failure)."""
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def lpips_pair(tmp_path_factory):
    """(random-weight PyTorch LPIPS, head file, AlexNet file), the files in the formats users supply: the
    lpips package's alex.pth and torchvision's AlexNet state dict."""
    import torch

    from torch_reference import TorchLPIPS

    torch.manual_seed(0)
    ref = TorchLPIPS().eval()
    folder = tmp_path_factory.mktemp("lpips")
    lin_path, alex_path = folder / "alex.pth", folder / "alexnet.pth"
    torch.save({f"lin{i}.model.1.weight": lin.weight.detach() for i, lin in enumerate(ref.lins)}, lin_path)
    trunk = {f"features.{k}": v for k, v in ref.features.state_dict().items()}
    trunk["classifier.1.weight"] = torch.zeros(4096, 9216)  # torchvision's file carries the classifier too
    torch.save(trunk, alex_path)
    return ref, str(lin_path), str(alex_path)


# ------------------------------------------------- a second reference folder (DESIGN §5: any folder holds)


def _official_state_dict(model, renames) -> dict:
    """A Flax model's parameters under the PyTorch names, in PyTorch layout (Linear (O, I), conv (O, I, *k)):
    the inverse of the converters' mapping, which reads them back."""
    from flax import nnx

    from m3ddm_jax.convert.mapping import torch_name

    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        x = np.asarray(var.get_value(), np.float32)
        if path[-1] == "kernel":
            x = x.T if x.ndim == 2 else np.moveaxis(x, (-1, -2), (0, 1))
        out[torch_name(path, renames)] = np.ascontiguousarray(x)
    return out


def _random_model(cls, config, seed):
    from flax import nnx

    from m3ddm_jax.models.layers import random_init

    return random_init(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))), seed=seed)


@pytest.fixture(scope="session")
def other_reference_dir(reference_dir, tmp_path_factory):
    """A second folder of the reference structure, built from other values (test_reference_folders.py says
    which): the reference tests that read such values run on it too, through each_reference_dir."""
    import shutil

    from safetensors.numpy import save_file

    from m3ddm_jax.convert import m3ddm
    from m3ddm_jax.convert import vae as vae_convert
    from m3ddm_jax.models.unet3d import UNet3D, UNet3DConfig
    from m3ddm_jax.models.vae import AutoencoderKL, VAEConfig

    folder = tmp_path_factory.mktemp("other_reference")
    unet_json = json.loads((reference_dir / "config.json").read_text())
    unet_json["layers_per_block"] = 1 if unet_json["layers_per_block"] != 1 else 2
    unet = _random_model(UNet3D, UNet3DConfig.from_diffusers(unet_json), seed=3)
    (folder / "config.json").write_text(json.dumps(unet_json))
    save_file(_official_state_dict(unet, m3ddm.UNET_RENAMES), str(folder / "unet_tiny.safetensors"))

    vae_json = json.loads((reference_dir / "vae_config.json").read_text())
    vae_json["block_out_channels"] = [c // 2 if c % (2 * vae_json["norm_num_groups"]) == 0 else 2 * c
                                      for c in vae_json["block_out_channels"]]
    vae = _random_model(AutoencoderKL, VAEConfig.from_diffusers(vae_json), seed=4)
    (folder / "vae_config.json").write_text(json.dumps(vae_json))
    save_file(_official_state_dict(vae, vae_convert.RENAMES), str(folder / "vae_tiny.safetensors"))

    # The example's frames with a ratio list whose canvas is the same (the official canvas fits the largest
    # extension over the list) but whose first crop is another: 16:9 before the case's own ratios.
    preprocess = json.loads((reference_dir / "preprocess.json").read_text())
    case = preprocess["example_npz"]["case"]
    case["target_ratio_list"] = f"16:9,{case['target_ratio_list']}"
    preprocess["cases"] = []
    (folder / "preprocess.json").write_text(json.dumps(preprocess))
    shutil.copy(reference_dir / preprocess["example_npz"]["file"], folder / preprocess["example_npz"]["file"])
    return folder


@pytest.fixture(scope="session", params=["shared", "other"])
def each_reference_dir(request):
    """The reference folder, then the other folder: for the reference tests that read values a folder may
    choose (layers_per_block, VAE widths, the example's ratio list)."""
    return request.getfixturevalue("reference_dir" if request.param == "shared" else "other_reference_dir")
