"""Every config in configs/ loads, and its data and mesh settings are valid."""

import pytest

from conftest import REPO
from m3ddm_jax import sharding
from m3ddm_jax.configlib import load_config as load
from m3ddm_jax.models.unet3d import UNet3DConfig
from m3ddm_jax.training.trainer import data_config

# Training configs; evaluation and batch-inference configs (eval_*, infer_*) have their own tests.
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.py") if not p.stem.startswith(("eval_", "infer_")))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_is_valid(path):
    cfg = load(path)
    if not cfg.data.root and not cfg.data.sources:
        cfg.data.root = str(REPO / "assets" / "videos")  # the paper config leaves the data folder to the user
    data = data_config(cfg)
    assert data.clip.size[0] % 8 == 0 and data.batch_size >= 1
    assert cfg.optim.total_steps == cfg.total_steps
    UNet3DConfig(**{**cfg.model.to_dict(), "dtype": cfg.compute_dtype, "remat": cfg.remat})
    assert set(cfg.mesh) <= set(sharding.MESH_AXES)
    assert {name for name, _ in cfg.logical_axis_rules} >= {"batch", "embed", "heads", "mlp"}


def test_no_data_is_a_clear_error():
    cfg = load(REPO / "configs" / "m3ddm_sd15_256.py")
    with pytest.raises(ValueError, match="--config.data.root=DIR"):
        data_config(cfg)
