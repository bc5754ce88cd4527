"""The logical-axis rules: the axes the UNet's layers carry, how they resolve on a mesh, and the start-up
log of parameters that do not split as the rules ask."""

import logging

import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from m3ddm_jax import sharding
from m3ddm_jax.models.layers import linear, make_rngs
from m3ddm_jax.models.unet3d import UNet3D, UNet3DConfig
from m3ddm_jax.sharding import CONV_IN, CONV_OUT, EMBED, FSDP, MESH_AXES, MLP, TENSOR

MESH = AbstractMesh((1, 4, 2), MESH_AXES)  # fsdp 4 x tensor 2: resolving specs needs only the axis sizes
CONFIG = UNet3DConfig(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock3D", "DownBlockP3D"),
                      up_block_types=("UpBlockP3D", "CrossAttnUpBlock3D"), layers_per_block=1, attention_heads=2,
                      norm_num_groups=4, cross_attention_dim=16, temporal_position_dim=8, global_encoder=False)


@pytest.fixture(scope="module")
def unet():
    return nnx.eval_shape(lambda: UNet3D(CONFIG, rngs=make_rngs()))


def axes_of(layer):
    return tuple(layer.kernel.get_metadata()["logical_axes"]), tuple(layer.bias.get_metadata()["logical_axes"])


def test_projections_carry_their_own_axes(unet):
    """proj_in / proj_out map feature-map channels into the transformer's width and back, the embedding
    projections map the time (fps) embedding onto the conv channels, the shortcut is a 1x1x1 conv: none is an
    MLP layer, so none splits over the tensor axis, and each kernel's input dimension splits over fsdp."""
    transformer, resnet = unet.down_blocks[0].attentions[0], unet.down_blocks[1].resnets[0]
    expected = {
        "proj_in": ((CONV_IN, EMBED), (EMBED,)), "proj_in2": ((CONV_IN, EMBED), (EMBED,)),
        "proj_out": ((EMBED, CONV_OUT), (CONV_OUT,)), "proj_out2": ((EMBED, CONV_OUT), (CONV_OUT,)),
        "time_emb_proj": ((EMBED, CONV_OUT), (CONV_OUT,)), "fps_emb_proj": ((EMBED, CONV_OUT), (CONV_OUT,)),
        "conv_shortcut": ((CONV_IN, CONV_OUT), (CONV_OUT,)),
    }
    for name, axes in expected.items():
        layer = getattr(transformer if name.startswith("proj") else resnet, name)
        assert axes_of(layer) == axes, name
        kernel = sharding.logical_to_spec(axes[0], layer.kernel.shape, MESH)
        assert kernel == P(FSDP, None), (name, kernel)
    # The feed-forward is the MLP: its hidden width splits over the tensor axis.
    ff = transformer.transformer_blocks[0].ff
    assert axes_of(ff.proj) == ((EMBED, MLP), (MLP,))
    assert sharding.logical_to_spec(axes_of(ff.proj)[0], ff.proj.kernel.shape, MESH) == P(FSDP, TENSOR)


def test_linear_needs_its_axes():
    with pytest.raises(TypeError, match="axes"):
        linear(4, 4, rngs=make_rngs(), dtype="float32")


def test_unsplit_parameters_are_logged(unet, caplog):
    """A dimension the rules split over mesh axes that do not divide it stays whole (replicated along them),
    and the start-up log names the parameter, the dimension and the mesh axes."""
    layer = nnx.eval_shape(lambda: linear(8, 5, axes=(EMBED, MLP), rngs=make_rngs(), dtype="float32"))
    assert sharding.logical_to_spec((EMBED, MLP), (8, 5), MESH) == P(FSDP, None)  # 5 does not split over 2
    whole = nnx.eval_shape(lambda: linear(8, 8, axes=(EMBED, MLP), rngs=make_rngs(), dtype="float32"))
    with caplog.at_level(logging.INFO, logger="m3ddm_jax.sharding"):
        sharding.log_unsplit({"odd": nnx.state(layer), "even": nnx.state(whole)}, MESH)
    (record,) = caplog.records
    assert record.getMessage().splitlines()[1:] == [
        "  odd/bias (5,): dim 0 (mlp=5) not over tensor=2",
        "  odd/kernel (8, 5): dim 1 (mlp=5) not over tensor=2"]
    assert "2 parameters" in record.getMessage() and "{'data': 1, 'fsdp': 4, 'tensor': 2}" in record.getMessage()

    # The UNet's input conv has 9 channels (noisy latent, conditioning latent, mask): they cannot split 4 ways.
    lines = sharding.unsplit_parameters(nnx.state(unet), MESH)
    assert "conv_in/kernel (3, 3, 9, 8): dim 2 (conv_in=9) not over fsdp=4" in lines
    assert not [line for line in lines if line.startswith("conv_out/")]  # 8 channels in: split


def test_everything_split_is_logged_too(caplog):
    whole = nnx.eval_shape(lambda: linear(8, 8, axes=(EMBED, MLP), rngs=make_rngs(), dtype="float32"))
    with caplog.at_level(logging.INFO, logger="m3ddm_jax.sharding"):
        sharding.log_unsplit(nnx.state(whole), MESH)
    assert [r.getMessage() for r in caplog.records] == [
        "every parameter splits as the logical-axis rules ask on mesh {'data': 1, 'fsdp': 4, 'tensor': 2}"]
