"""The reference tests hold for any folder of the same structure (DESIGN §5), not only for the shared one.

A second folder is built in a temporary directory from other values: a UNet with another layers_per_block
(random weights saved under the official names), a VAE with other widths, and a
preprocessing example whose case has another target-ratio list (the same official canvas, another crop).
The reference tests that read such values then run on it.
"""

import json

import pytest

pytestmark = pytest.mark.reference


def test_the_other_folder_differs(reference_dir, other_reference_dir):
    """Guards the proof: the values the parametrised reference tests once hard-coded (test_convert's
    wrong-config and CLI tests, test_video's canvas test, all run on each_reference_dir) are not the shared
    folder's."""
    read = lambda folder, name: json.loads((folder / name).read_text())
    shared, other = reference_dir, other_reference_dir
    assert read(other, "config.json")["layers_per_block"] != read(shared, "config.json")["layers_per_block"]
    assert (read(other, "vae_config.json")["block_out_channels"]
            != read(shared, "vae_config.json")["block_out_channels"])
    cases = [read(f, "preprocess.json")["example_npz"]["case"] for f in (shared, other)]
    assert cases[0]["target_ratio_list"] != cases[1]["target_ratio_list"]
