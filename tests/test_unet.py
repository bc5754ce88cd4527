"""UNet3D and global-frame encoder against the official PyTorch fixtures; the full-size parameter manifest."""

import csv
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_json
from m3ddm_jax.convert import m3ddm
from m3ddm_jax.models import attention
from m3ddm_jax.models.embeddings import sinusoidal_embedding
from m3ddm_jax.models.layers import make_rngs
from m3ddm_jax.models.remat import Remat
from m3ddm_jax.models.unet3d import MidBlock, UNet3DConfig

CASES = (load_json("unet_cases.json") or {}).get("cases", [])
TOL = 1e-4


def ncfhw_to_bfhwc(x):
    return np.moveaxis(x, 1, -1)


def load_tiny(reference_dir, **overrides):
    """The tiny official UNet (config fields replaced by `overrides`), its state and a jitted forward taking
    the official call's arguments."""
    meta = json.loads((reference_dir / "unet_cases.json").read_text())
    model = m3ddm.load_official(str(reference_dir / meta["weights"]), str(reference_dir / meta["config"]),
                                **overrides)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnames="rows")
    def forward(state, sample, timestep, fps, cond_latents, uncond_latents, rows):
        unet = nnx.merge(graphdef, state)
        return unet(sample, timestep, fps, branch_tokens(unet, cond_latents, uncond_latents, rows))

    return model, state, forward


@pytest.fixture(scope="module")
def tiny(reference_dir):
    return load_tiny(reference_dir)


def official_fps(d):
    """A fixture case's fps as the official model sees it: a Python float reaches it as int64."""
    fps = d["fps"]
    return np.trunc(fps) if fps.ndim == 0 and fps.dtype.kind == "f" else fps


def official_case_output(forward, state, d):
    """The forward's output (NCFHW, numpy) on the inputs of a fixture case file `d`, as the official call
    passes them."""
    latents = jnp.asarray(ncfhw_to_bfhwc(d["encoder_hidden_states"]))
    layout = (official_layout(int(d["do_classfier"]), bool(d["is_empty_img"])), int(d["g"]))
    out = forward(state, jnp.asarray(ncfhw_to_bfhwc(d["sample"])), jnp.asarray(d["timestep"]),
                  jnp.asarray(official_fps(d)), latents, jnp.zeros_like(latents), rows=layout)
    return np.moveaxis(np.asarray(out), -1, 1)


def branch_tokens(unet, cond_latents, uncond_latents, layout):
    """Tokens for the official do_classfier row layouts, from cond tokens and uncond (zero-latent) tokens."""
    b = cond_latents.shape[0] // layout[1]
    cond = unet.encode_global(cond_latents, b)
    uncond = unet.encode_global(uncond_latents, b)
    return jnp.concatenate([cond if kind == "c" else uncond for kind in layout[0]], axis=0)


def official_layout(do_classfier, is_empty_img):
    """Row blocks of the official model: zeros before the real latents, or after them with is_empty_img."""
    return {1: "c", 2: "cu" if is_empty_img else "uc", 4: "uucc"}[do_classfier]


@pytest.mark.reference
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_unet_matches_official(case, tiny, reference_dir):
    model, state, forward = tiny
    d = np.load(reference_dir / case["file"])
    diff = np.abs(official_case_output(forward, state, d) - d["output"]).max()
    print(f"{case['name']}: max abs diff {diff:.3g}")
    assert diff <= TOL

    fps = official_fps(d)
    n = d["sample"].shape[0]
    cfg = model.config
    emb = lambda v, period: sinusoidal_embedding(np.broadcast_to(v, (n,)), cfg.block_out_channels[0],
                                                 max_period=period)
    np.testing.assert_allclose(model.time_embedding(emb(d["timestep"], cfg.timestep_max_period)), d["debug_temb"],
                               atol=TOL)
    np.testing.assert_allclose(model.fps_embedding(emb(fps, cfg.fps_max_period)), d["debug_femb"], atol=TOL)


@pytest.mark.reference
def test_global_encoder_matches_official(tiny, reference_dir):
    model = tiny[0]
    d = np.load(reference_dir / "light_image_encoder.npz")
    inputs = sorted(k for k in d.files if k.startswith("input_"))
    assert inputs, "light_image_encoder.npz has no input_* arrays"
    for key in inputs:
        out = model.global_img_encoder(jnp.asarray(ncfhw_to_bfhwc(d[key])))
        diff = np.abs(np.moveaxis(np.asarray(out), -1, 1) - d["output_" + key[len("input_"):]]).max()
        print(f"{key}: max abs diff {diff:.3g}")
        assert diff <= TOL


@pytest.mark.reference
def test_unconditional_tokens_are_encoded_zeros(tiny):
    """The sampler's global contexts (what its guidance branches get): the conditional one is the encoder on
    the video's global latents, the unconditional one the encoder on zero latents (the official forward
    encodes zero latents for its unconditional rows; see the fixtures' README), which is not zero tokens."""
    from m3ddm_jax.jitting import Static
    from m3ddm_jax.sampling.pipeline import _global_tokens

    unet = tiny[0]
    latents = jax.random.normal(jax.random.key(0), (3, 16, 16, 4))
    graphdef, state = nnx.split(unet)
    cond, uncond = _global_tokens(Static(graphdef), state, latents)
    assert cond.shape == uncond.shape == (1, 3 * 6 * 6, 320)
    np.testing.assert_allclose(cond, unet.encode_global(latents, 1), atol=1e-5)
    np.testing.assert_allclose(uncond, unet.encode_global(jnp.zeros_like(latents), 1), atol=1e-5)
    assert float(jnp.abs(uncond).mean()) > 0.1 * float(jnp.abs(cond).mean())  # far from zero tokens
    assert not np.allclose(uncond, cond, atol=1e-3)


@pytest.mark.reference
def test_tiny_parameter_count(tiny, reference_dir):
    meta = json.loads((reference_dir / "unet_cases.json").read_text())
    params = nnx.state(tiny[0], nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(params)) == meta["num_parameters"]


@pytest.mark.reference
def test_full_size_config_matches_manifest(reference_dir):
    """The released model's configuration, built abstractly, maps 1:1 onto every entry of the manifest."""
    summary = json.loads((reference_dir / "param_manifest_full_summary.json").read_text())
    config = UNet3DConfig.from_diffusers(summary["config"])
    assert config == UNet3DConfig()  # the defaults are the released model
    with open(reference_dir / "param_manifest_full.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    shapes = {r["name"]: tuple(json.loads(r["shape"])) for r in rows}
    plan = m3ddm.check_unet_shapes(config, shapes)  # raises, listing every problem, on any mismatch
    assert set(plan.targets) | set(plan.ignored) == set(shapes)
    model = m3ddm.abstract_unet(config)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == summary["num_parameters"]
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat))) == summary["num_buffer_elements"] - (
        summary["num_buffer_tensors"] // 3)  # running mean/var; num_batches_tracked (one element each) is unused


def test_latent_size_must_fit_the_downsampling():
    cfg = UNet3DConfig(block_out_channels=(8, 8), down_block_types=("CrossAttnDownBlock3D", "DownBlockP3D"),
                       up_block_types=("UpBlockP3D", "CrossAttnUpBlock3D"), attention_heads=2, norm_num_groups=4,
                       cross_attention_dim=16, temporal_position_dim=8)
    model = m3ddm.abstract_unet(cfg)
    with pytest.raises(ValueError, match="multiple of 2"):
        nnx.eval_shape(lambda m: m(jnp.zeros((1, 2, 5, 6, 9)), 1, 1, jnp.zeros((1, 3, 16))), model)


def test_unknown_block_type_is_rejected():
    with pytest.raises(ValueError, match="unknown down block type 'DownBlock3D'"):
        UNet3DConfig(down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",))


@pytest.mark.parametrize("value, policy", [("none", None), ("full", jax.checkpoint_policies.nothing_saveable),
                                           ("dots", jax.checkpoint_policies.dots_with_no_batch_dims_saveable)])
def test_remat_value_names_its_checkpoint_policy(value, policy):
    """Each config string is a Remat whose blocks, traced in the mid block (resnet, transformer, resnet), run
    under that jax.checkpoint policy; 'none' applies no checkpoint at all."""
    remat = Remat.parse(value)
    assert remat == value and remat.policy is policy
    cfg = UNet3DConfig(block_out_channels=(8, 8), down_block_types=("CrossAttnDownBlock3D", "DownBlockP3D"),
                       up_block_types=("UpBlockP3D", "CrossAttnUpBlock3D"), attention_heads=2, norm_num_groups=4,
                       cross_attention_dim=16, remat=value)
    assert cfg.remat is remat
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MidBlock(8, cfg, rngs=make_rngs())))
    temb = jax.ShapeDtypeStruct((1, 32), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda s, x, t: nnx.merge(graphdef, s)(x, t, t, jnp.zeros((1, 3, 16))))(
        state, jax.ShapeDtypeStruct((1, 2, 4, 4, 8), jnp.float32), temb)
    checkpoints = [e.params["policy"] for e in jaxpr.eqns if e.primitive.name == "remat2"]
    assert checkpoints == ([] if remat is Remat.NONE else [policy] * 3)


def test_unknown_remat_names_the_allowed_values():
    with pytest.raises(ValueError, match=r"remat='dot'.*expected one of \['none', 'full', 'dots'\]"):
        UNet3DConfig(remat="dot")


# ------------------------------------------------------------- the official cases with chunked attention (slow)


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_unet_with_chunked_matches_official(case, reference_dir, monkeypatch):
    """The official fixture cases with every attention of the tiny UNet chunked: blocks of 16 KiB of scores
    and 64 keys, so that batch blocks, query blocks and the online softmax all run (~1 min per case)."""
    monkeypatch.setattr(attention, "CHUNK_BYTES", 16 << 10)
    monkeypatch.setattr(attention, "CHUNK_KEYS", 64)
    _, state, forward = load_tiny(reference_dir, attention_impl="chunked")
    d = np.load(reference_dir / case["file"])
    diff = np.abs(official_case_output(forward, state, d) - d["output"]).max()
    print(f"{case['name']}: max abs diff {diff:.3g}")
    assert diff <= TOL
