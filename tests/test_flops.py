"""Analytic FLOP counting from jaxprs (used by the benchmarks and MFU figures)."""

import jax
import jax.numpy as jnp
from flax import nnx

from m3ddm_jax import pretrained
from m3ddm_jax.flops import count_flops
from m3ddm_jax.models.unet3d import UNet3DConfig


def test_matmul_conv_scan_and_nested_jit_counts():
    a, b = jnp.zeros((3, 5, 7)), jnp.zeros((3, 7, 11))
    assert count_flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b) == 2 * 3 * 5 * 7 * 11
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert count_flops(conv, jnp.zeros((2, 8, 8, 4)), jnp.zeros((3, 3, 4, 6))) == 2 * (2 * 4 * 4 * 6) * 4 * 9
    scan = lambda x: jax.lax.scan(lambda c, _: (c @ c, None), x, None, length=4)[0]
    assert count_flops(jax.jit(scan), jnp.zeros((5, 5))) == 4 * 2 * 5 * 5 * 5


def test_unet_count_is_the_matmul_part_of_xla_cost():
    """XLA's estimate adds elementwise work (norms, softmax, activations) to the matmuls and convs we count."""
    cfg = UNet3DConfig(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock3D", "DownBlockP3D"),
                       up_block_types=("UpBlockP3D", "CrossAttnUpBlock3D"), attention_heads=2, norm_num_groups=8)
    graphdef, state = nnx.split(pretrained.abstract_model(cfg))
    fn = lambda st, x, tok: nnx.merge(graphdef, st)(x, 501, 8.0, tok)
    args = (state, jax.ShapeDtypeStruct((2, 4, 16, 16, 9), jnp.float32), jax.ShapeDtypeStruct((2, 12, 320), jnp.float32))
    ours = count_flops(fn, *args)
    xla = jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]
    assert 0.75 * xla <= ours <= xla
