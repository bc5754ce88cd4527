"""The reference tests hold for any folder of the same structure (DESIGN §5), not only for the shared one.

A second folder is built in a temporary directory from other values: a UNet with another layers_per_block
(random weights saved under the official names), a VAE with other widths, and a
preprocessing example whose case has another target-ratio list (the same official canvas, another crop).
The reference tests that read such values then run on it.
"""

import json
import shutil

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import test_convert
import test_video
from m3ddm_jax.convert import m3ddm
from m3ddm_jax.convert import vae as vae_convert
from m3ddm_jax.convert.mapping import torch_name
from m3ddm_jax.models.layers import random_init
from m3ddm_jax.models.unet3d import UNet3D, UNet3DConfig
from m3ddm_jax.models.vae import AutoencoderKL, VAEConfig

pytestmark = pytest.mark.reference


def official_state_dict(model, renames) -> dict:
    """A Flax model's parameters under the PyTorch names, in PyTorch layout (Linear (O, I), conv (O, I, *k)):
    the inverse of the converters' mapping, which reads them back."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        x = np.asarray(var.get_value(), np.float32)
        if path[-1] == "kernel":
            x = x.T if x.ndim == 2 else np.moveaxis(x, (-1, -2), (0, 1))
        out[torch_name(path, renames)] = np.ascontiguousarray(x)
    return out


def random_model(cls, config, seed):
    return random_init(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))), seed=seed)


@pytest.fixture(scope="module")
def other_folder(reference_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("other_reference")
    unet_json = json.loads((reference_dir / "config.json").read_text())
    unet_json["layers_per_block"] = 1 if unet_json["layers_per_block"] != 1 else 2
    unet = random_model(UNet3D, UNet3DConfig.from_diffusers(unet_json), seed=3)
    (folder / "config.json").write_text(json.dumps(unet_json))
    save_file(official_state_dict(unet, m3ddm.UNET_RENAMES), str(folder / "unet_tiny.safetensors"))

    vae_json = json.loads((reference_dir / "vae_config.json").read_text())
    vae_json["block_out_channels"] = [c // 2 if c % (2 * vae_json["norm_num_groups"]) == 0 else 2 * c
                                      for c in vae_json["block_out_channels"]]
    vae = random_model(AutoencoderKL, VAEConfig.from_diffusers(vae_json), seed=4)
    (folder / "vae_config.json").write_text(json.dumps(vae_json))
    save_file(official_state_dict(vae, vae_convert.RENAMES), str(folder / "vae_tiny.safetensors"))

    # The example's frames with a ratio list whose canvas is the same (the official canvas fits the largest
    # extension over the list) but whose first crop is another: 16:9 before the case's own ratios.
    preprocess = json.loads((reference_dir / "preprocess.json").read_text())
    case = preprocess["example_npz"]["case"]
    case["target_ratio_list"] = f"16:9,{case['target_ratio_list']}"
    preprocess["cases"] = []
    (folder / "preprocess.json").write_text(json.dumps(preprocess))
    shutil.copy(reference_dir / preprocess["example_npz"]["file"], folder / preprocess["example_npz"]["file"])
    return folder, unet_json, vae_json


def test_the_other_folder_differs(reference_dir, other_folder):
    """Guards the proof below: the values the three tests once hard-coded are not the shared folder's."""
    folder, unet_json, vae_json = other_folder
    reference = json.loads((reference_dir / "config.json").read_text())
    assert unet_json["layers_per_block"] != reference["layers_per_block"]
    assert vae_json["block_out_channels"] != json.loads((reference_dir / "vae_config.json").read_text())[
        "block_out_channels"]
    cases = [json.loads((f / "preprocess.json").read_text())["example_npz"]["case"] for f in (reference_dir, folder)]
    assert cases[0]["target_ratio_list"] != cases[1]["target_ratio_list"]


def test_convert_checks_hold_on_another_folder(other_folder, tmp_path):
    folder = other_folder[0]
    official = test_convert.load_official_pair(folder)
    for name, test in (("wrong", test_convert.test_wrong_config_for_the_weights),
                       ("cli", test_convert.test_cli_writes_a_folder_that_loads_with_one_call)):
        (tmp_path / name).mkdir()
        test(tmp_path / name, folder, official)


def test_canvas_check_holds_on_another_folder(other_folder, monkeypatch):
    folder = other_folder[0]
    monkeypatch.setattr(test_video, "PREPROCESS", json.loads((folder / "preprocess.json").read_text()))
    test_video.test_official_canvas_matches_example(test_video.load_example(folder))
