"""Checkpoint conversion: the CLI, pickled and fp16 checkpoints, and clear errors for bad checkpoints."""

import json
import os
import re
import shutil
import sys

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from conftest import REPO, flat_params
from m3ddm_jax import pretrained
from m3ddm_jax.convert import m3ddm
from m3ddm_jax.convert.mapping import CheckpointMismatchError
from m3ddm_jax.convert.sources import CheckpointReadError, open_state_dict
from m3ddm_jax.convert.vae import vae_from_torch
from m3ddm_jax.models.vae import VAEConfig

sys.path.insert(0, str(REPO / "tools"))
import convert_checkpoint  # noqa: E402

pytestmark = pytest.mark.reference


def load_official_pair(folder):
    """A reference folder's official state dict and its Flax conversion."""
    sd = load_file(str(folder / "unet_tiny.safetensors"))
    model = m3ddm.load_official(str(folder / "unet_tiny.safetensors"), str(folder / "config.json"))
    return sd, flat_params(model)


@pytest.fixture(scope="module")
def official(reference_dir):
    return load_official_pair(reference_dir)


@pytest.fixture(scope="module")
def each_official(each_reference_dir):
    """load_official_pair of each folder of conftest's each_reference_dir."""
    return load_official_pair(each_reference_dir)


def write_checkpoint(folder, sd, reference_dir, fmt="safetensors"):
    """A released-checkpoint-like folder: config.json + diffusion_pytorch_model.<fmt>."""
    os.makedirs(folder, exist_ok=True)
    shutil.copy(reference_dir / "config.json", folder / "config.json")
    path = folder / f"diffusion_pytorch_model.{fmt}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path)
    return path


def test_cli_writes_a_folder_that_loads_with_one_call(tmp_path, each_reference_dir, each_official):
    ref, official = each_reference_dir, each_official
    dst = tmp_path / "weights"
    rc = convert_checkpoint.main(["m3ddm", "--src", str(ref / "unet_tiny.safetensors"), "--config",
                                  str(ref / "config.json"), "--vae", str(ref / "vae_tiny.safetensors"),
                                  "--vae-config", str(ref / "vae_config.json"), "--dst", str(dst)])
    assert rc == 0
    weights = pretrained.load_weights(str(dst))
    got = flat_params(weights.unet)
    assert got.keys() == official[1].keys()
    for k, v in official[1].items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert weights.scheduler_config == pretrained.SD15_SCHEDULER_CONFIG  # no --scheduler-config given
    # The VAE is the folder's: its config.json, its tensors.
    vae_config = VAEConfig.from_diffusers(json.loads((ref / "vae_config.json").read_text()))
    assert weights.vae.config == vae_config
    want = flat_params(vae_from_torch(open_state_dict(str(ref / "vae_tiny.safetensors")), vae_config))
    got = flat_params(weights.vae)
    assert got.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]  # no temporary left behind
    # A second conversion onto the same folder is refused rather than silently mixing outputs.
    assert convert_checkpoint.main(["m3ddm", "--src", str(ref / "unet_tiny.safetensors"), "--config",
                                    str(ref / "config.json"), "--dst", str(dst)]) == 1


def test_load_overrides_compute_dtype(tmp_path, reference_dir):
    unet = m3ddm.load_official(str(reference_dir / "unet_tiny.safetensors"), str(reference_dir / "config.json"))
    pretrained.save_model(str(tmp_path / "unet"), unet, unet.config)
    loaded = pretrained.load_model(str(tmp_path / "unet"), dtype="bfloat16")
    assert loaded.config.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(nnx.state(loaded))} == {np.dtype("float32")}  # params stay float32


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_pickled_checkpoint_folder(tmp_path, reference_dir, official, half):
    """The released file is a (2.6 GB, fp16) pickle: it loads through the restricted unpickler, memory-mapped."""
    sd, expected = official
    if half:
        sd = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in sd.items()}
    write_checkpoint(tmp_path, sd, reference_dir, fmt="bin")
    got = flat_params(m3ddm.load_official(str(tmp_path)))
    for k, v in expected.items():
        want = v.astype(np.float16).astype(np.float32) if half else v
        np.testing.assert_array_equal(got[k], want, err_msg=k)


def mutated(sd, drop=(), add=(), reshape=()):
    sd = {k: v for k, v in sd.items() if k not in drop}
    sd.update({k: np.zeros(3, np.float32) for k in add})
    sd.update({k: np.zeros((7, 5), np.float32) for k in reshape})
    return sd


@pytest.mark.parametrize("change, expect", [
    (dict(drop=["down_blocks.1.attentions.0.proj_in2.weight"]),
     r"1 missing(.|\n)*missing keys: down_blocks\.1\.attentions\.0\.proj_in2\.weight"),
    (dict(add=["down_blocks.0.extra_layer.weight"]),
     r"1 unexpected(.|\n)*unexpected keys: down_blocks\.0\.extra_layer\.weight"),
    (dict(reshape=["conv_in.weight"]),
     r"conv_in\.weight \(checkpoint \(7, 5\), model expects \(3, 3, 9, 16\) in Flax layout\)"),
], ids=["missing", "extra", "shape"])
def test_mismatched_checkpoint_is_named(tmp_path, reference_dir, official, change, expect):
    write_checkpoint(tmp_path, mutated(official[0], **change), reference_dir)
    with pytest.raises(CheckpointMismatchError, match=expect):
        m3ddm.load_official(str(tmp_path))


def test_cli_reports_mismatch_and_writes_nothing(tmp_path, reference_dir, official, capsys):
    write_checkpoint(tmp_path / "src", mutated(official[0], drop=["conv_in.bias"]), reference_dir)
    rc = convert_checkpoint.main(["m3ddm", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "out")])
    assert rc == 1
    assert "missing keys: conv_in.bias" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_file(tmp_path, reference_dir, official, fmt):
    path = write_checkpoint(tmp_path, official[0], reference_dir, fmt=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointReadError, match=f"{path}.*(truncated|corrupt)"):
        m3ddm.load_official(str(tmp_path))


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path, reference_dir):
    marker = tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = marker
    shutil.copy(reference_dir / "config.json", tmp_path / "config.json")
    torch.save({"conv_in.weight": payload}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointReadError, match="refused to load this pickle"):
        m3ddm.load_official(str(tmp_path))
    assert not marker.exists()


def test_wrong_config_for_the_weights(tmp_path, each_reference_dir, each_official):
    """One more layer per block than the weights have: the new layers' tensors are reported missing (in every
    block), nothing is unexpected, a shape differs only where an up block's skip inputs moved, and the
    message counts them."""
    reference_dir, official = each_reference_dir, each_official
    path = write_checkpoint(tmp_path, official[0], reference_dir)
    config = json.loads((reference_dir / "config.json").read_text())
    n = config["layers_per_block"]
    (tmp_path / "config.json").write_text(json.dumps({**config, "layers_per_block": n + 1}))
    with pytest.raises(CheckpointMismatchError) as err:
        m3ddm.load_official(str(path.parent))
    missing = err.value.missing
    assert missing and not err.value.unexpected
    assert [k for k, *_ in err.value.mismatched if not re.match(r"up_blocks\.\d+\.resnets\.", k)] == []
    # Down blocks have n layers (indices 0..n-1), up blocks n + 1: the new ones are n and n + 1.
    new_layer = re.compile(rf"^(down_blocks\.(\d+)\.(resnets|attentions)\.{n}|up_blocks\.(\d+)\.(resnets|attentions)\.{n + 1})\.")
    assert [k for k in missing if not new_layer.match(k)] == []
    blocks = len(config["block_out_channels"])
    assert {k.split(".")[0] + k.split(".")[1] for k in missing} == {f"{side}_blocks{i}" for side in ("down", "up")
                                                                      for i in range(blocks)}
    assert re.search(rf"{len(missing)} missing(.|\n)*missing keys: ", str(err.value))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.safetensors or "
                                                "diffusion_pytorch_model.bin"):
        m3ddm.load_official(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrained.load_weights(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="not a converted model folder"):
        pretrained.load_weights(str(tmp_path))


def test_tampered_weights_folder(tmp_path, reference_dir):
    unet = m3ddm.load_official(str(reference_dir / "unet_tiny.safetensors"), str(reference_dir / "config.json"))
    pretrained.save_model(str(tmp_path), unet, unet.config)
    params = load_file(str(tmp_path / pretrained.PARAMS_FILE))
    del params["conv_out.temporal_conv.bias"]
    save_file(params, str(tmp_path / pretrained.PARAMS_FILE))
    with pytest.raises(CheckpointMismatchError, match="missing keys: conv_out.temporal_conv.bias"):
        pretrained.load_model(str(tmp_path))


def damage(path, how: str) -> None:
    """Truncates a file to half its size, or replaces its bytes with text."""
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2] if how == "truncated" else b"not what it should be")


@pytest.mark.parametrize("part, how", [
    (f"unet/{pretrained.PARAMS_FILE}", "truncated"), (f"vae/{pretrained.PARAMS_FILE}", "garbage"),
    (f"unet/{pretrained.CONFIG_FILE}", "truncated"),
    (f"{pretrained.SCHEDULER}/{pretrained.SCHEDULER_FILE}", "garbage")])
def test_damaged_weights_folder_is_one_clear_error(tmp_path, tiny_weights, capsys, part, how):
    """A damaged file of a weights folder is a CheckpointReadError naming the file and the fix, whichever
    part it is; the CLIs that load a folder print it as one line and exit 1."""
    folder = tmp_path / "weights"
    shutil.copytree(tiny_weights, folder)
    path = folder / part
    damage(path, how)
    with pytest.raises(CheckpointReadError, match=f"(?s){re.escape(str(path))}.*convert_checkpoint"):
        pretrained.load_weights(str(folder))

    from m3ddm_jax import outpaint

    video = REPO / "assets" / "videos" / "stream_of_water.mp4"
    rc = outpaint.main([str(video), "--ratio", "9:16", "--output", str(tmp_path / "out.mp4"),
                        "--weights", str(folder), "--mode", "native", "--canvas-size", "64"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and f"{path}: " in err and "Traceback" not in err, err
    rc = convert_checkpoint.main(["inflate", "--src", str(folder), "--dst", str(tmp_path / "inflated")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith(f"error: {path}: "), err
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "inflated").exists()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_non_float_tensors_are_named(tmp_path, reference_dir, official, fmt, capsys):
    """Integer tensors are not cast to float: each one is listed with its name and dtype, in the same error as
    missing or misshapen tensors."""
    sd = dict(official[0])
    sd["conv_out.spatial_conv.weight"] = sd["conv_out.spatial_conv.weight"].astype(np.int8)
    sd["conv_in.bias"] = sd["conv_in.bias"].astype(np.int32)
    write_checkpoint(tmp_path / "src", sd, reference_dir, fmt=fmt)
    with pytest.raises(CheckpointMismatchError,
                       match=r"(?s)2 not floating-point.*conv_in\.bias \(int32\), conv_out\.spatial_conv\.weight \(int8\)"):
        m3ddm.load_official(str(tmp_path / "src"))
    rc = convert_checkpoint.main(["m3ddm", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "out")])
    assert rc == 1 and "conv_out.spatial_conv.weight (int8)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bfloat16_checkpoint_converts(tmp_path, reference_dir, official):
    """fp32, fp16 (test_pickled_checkpoint_folder) and bf16 sources all convert; bf16 values exactly."""
    from safetensors.torch import save_file as save_torch

    sd, expected = official
    os.makedirs(tmp_path / "src")
    shutil.copy(reference_dir / "config.json", tmp_path / "src" / "config.json")
    save_torch({k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16) for k, v in sd.items()},
               str(tmp_path / "src" / "diffusion_pytorch_model.safetensors"))
    got = flat_params(m3ddm.load_official(str(tmp_path / "src")))
    for k, v in expected.items():
        want = torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16).to(torch.float32).numpy()
        np.testing.assert_array_equal(got[k], want, err_msg=k)
