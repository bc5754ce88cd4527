"""Export (`tools/convert_checkpoint.py export`): a run folder -> a weights folder, and the errors of a run
folder that cannot be exported. The run here is made without training (a small UNet's state saved the way
the trainer saves it); exports of real runs are tested in test_train.py (2 processes, pixel space) and
test_configs.py (the paper config, SD-style VAE, then outpaint / infer / evaluate on the export)."""

import dataclasses
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, SMALL_UNET, flat, flat_params
from m3ddm_jax import pretrained
from m3ddm_jax.convert.mapping import CheckpointMismatchError
from m3ddm_jax.models.layers import random_init
from m3ddm_jax.models.pixel_space import PixelSpace, PixelSpaceConfig
from m3ddm_jax.training import export
from m3ddm_jax.training.checkpoint import Checkpointer

sys.path.insert(0, str(REPO / "tools"))
import convert_checkpoint  # noqa: E402

CODEC = PixelSpace(PixelSpaceConfig(factor=2))


def train_state(seed: int) -> dict:
    """What the trainer checkpoints (a TrainState's fields), with distinct raw and EMA parameters."""
    config = dataclasses.replace(SMALL_UNET, in_channels=2 * CODEC.config.latent_channels + 1,
                                 out_channels=CODEC.config.latent_channels, dtype="bfloat16", remat="dots")
    _, params, rest = nnx.split(random_init(pretrained.abstract_model(config), seed=seed), nnx.Param, ...)
    ema = jax.tree.map(lambda x: x * 0.5, params)
    return config, {"step": np.int32(0), "params": params, "rest": rest, "opt_state": {}, "ema": ema,
                    "skipped": np.int32(0)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with complete checkpoints at steps 2 and 4 (step 4: other parameters)."""
    folder = tmp_path_factory.mktemp("run")
    config, state = train_state(0)
    export.write_run_model(str(folder), config, CODEC, pretrained.SD15_SCHEDULER_CONFIG)
    ckpt = Checkpointer(str(folder / export.CHECKPOINTS), save_every=1, keep=5)
    states = {2: state, 4: train_state(1)[1]}
    for step, s in states.items():
        ckpt.save(step, s, None, {"step": step}, force=True)
    ckpt.wait()
    ckpt.close()
    return folder, states


def test_run_model_leaves_runtime_choices_to_the_loader(run_dir):
    """model/ records the architecture; the dtype, remat and attention kernel are chosen when loading."""
    config = pretrained.read_config(str(run_dir[0] / export.MODEL / pretrained.UNET))
    assert (config.dtype, config.remat, config.attention_impl) == ("float32", "none", "xla")
    assert config.block_out_channels == SMALL_UNET.block_out_channels


@pytest.mark.parametrize("args, step, field", [([], 4, "ema"), (["--step", "2", "--params", "raw"], 2, "params")],
                         ids=["newest-ema", "step2-raw"])
def test_export_loads_with_one_call(run_dir, tmp_path, capsys, args, step, field):
    folder, states = run_dir
    dst = tmp_path / "weights"
    assert convert_checkpoint.main(["export", "--src", str(folder), "--dst", str(dst), *args]) == 0, \
        capsys.readouterr().err
    weights = pretrained.load_weights(str(dst))
    want = {**flat(states[step][field]), **flat(states[step]["rest"])}
    got = flat_params(weights.unet)
    assert got.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert isinstance(weights.vae, PixelSpace) and weights.vae.config == CODEC.config
    assert weights.scheduler_config == pretrained.SD15_SCHEDULER_CONFIG
    report = json.loads((dst / "conversion.json").read_text())
    assert (report["step"], report["params"]) == (step, "raw" if field == "params" else "ema")
    assert f"wrote {dst} " in capsys.readouterr().out


def copy_run(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir[0], copy)
    return copy


def export_error(src, tmp_path, *args):
    with pytest.raises((OSError, ValueError)) as err:
        export.export(str(src), str(tmp_path / "out"), **dict(args))
    assert not (tmp_path / "out").exists()
    return str(err.value)


def test_errors_name_the_problem(run_dir, tmp_path, capsys):
    folder = run_dir[0]
    assert "run folder" in export_error(tmp_path / "nowhere", tmp_path) and "does not exist" in export_error(
        tmp_path / "nowhere", tmp_path)
    assert f"{tmp_path} is not a training run folder" in export_error(tmp_path, tmp_path)
    assert "has no checkpoint of step 3; complete steps: [2, 4]" in export_error(folder, tmp_path, ("step", 3))
    with pytest.raises(ValueError, match="params='last'; expected one of"):
        export.export(str(folder), str(tmp_path / "out"), params="last")

    # An interrupted save (orbax's temporary folder) is not a checkpoint; a run with only that has none.
    copy = copy_run(run_dir, tmp_path)
    os.rename(copy / export.CHECKPOINTS / "4", copy / export.CHECKPOINTS / "6.orbax-checkpoint-tmp-1764432000")
    assert "checkpoint step 6 of" in export_error(copy, tmp_path, ("step", 6))
    assert "is incomplete (its save was interrupted); complete steps: [2]" in export_error(copy, tmp_path, ("step", 6))
    assert export.choose_step(str(copy), None) == 2
    shutil.rmtree(copy / export.CHECKPOINTS / "2")
    assert "holds no complete checkpoint (only interrupted saves: steps [6])" in export_error(copy, tmp_path)

    # A checkpoint whose array files are gone (a partial copy) is named, with what to do.
    copy = copy_run(run_dir, tmp_path / "damaged")
    for entry in (copy / export.CHECKPOINTS / "4" / export.STATE).iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
    message = export_error(copy, tmp_path)
    assert f"{export.CHECKPOINTS}/4/{export.STATE} cannot be read" in message and "--step" in message

    # model/ that does not describe the checkpoint: every disagreeing tensor is listed.
    copy = copy_run(run_dir, tmp_path / "other_model")
    config = pretrained.read_config(str(copy / export.MODEL / pretrained.UNET))
    n = config.layers_per_block
    pretrained.save_config(str(copy / export.MODEL / pretrained.UNET), dataclasses.replace(config, layers_per_block=n + 1))
    with pytest.raises(CheckpointMismatchError, match=rf"(?s)missing, 0 unexpected.*missing keys: down_blocks\.0\."
                                                      rf"(attentions|resnets)\.{n}\..*does not describe this checkpoint"):
        export.export(str(copy), str(tmp_path / "out"))

    # The CLI: one line, exit status 1; an existing destination is not replaced without --overwrite.
    assert convert_checkpoint.main(["export", "--src", str(folder), "--dst", str(tmp_path / "out"), "--step", "3"]) == 1
    assert "error: " in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert convert_checkpoint.main(["export", "--src", str(folder), "--dst", str(tmp_path / "taken")]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
