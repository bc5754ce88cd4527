"""Stable Diffusion 1.x: conversion parity with diffusers (folder and original single file), the LDM key
tables, inflation into the M3DDM 3D UNet (the identity property), the full-size correspondence, bad input."""

import csv
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO
from m3ddm_jax import pretrained
from m3ddm_jax.convert import inflate, m3ddm, mapping, sd
from m3ddm_jax.convert.mapping import CheckpointMismatchError
from m3ddm_jax.models.unet3d import UNet3DConfig
from m3ddm_jax.models.vae import VAEConfig

sys.path.insert(0, str(REPO / "tools"))
import convert_checkpoint  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
TINY_UNET = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, cross_attention_dim=32)
TINY_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
CROSS_ATTN_OUT = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn2\.to_out\.")


@nnx.jit
def run_unet(unet, sample, t, fps, context):
    return unet(sample, t, fps, context)


@nnx.jit
def run_vae(vae, images, z):
    return vae.encode(images), vae.decode(z)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def flat_params(model) -> dict:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def nhwc(x):
    return np.moveaxis(np.asarray(x), 1, -1)


def randomise_norms(model, seed):
    """Norm affines away from 1/0, so that a swapped scale and bias cannot pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))


def ldm_state_dict(unet_sd, vae_sd, unet_config, vae_config):
    """An original single-file state dict, made with the converter's own tables (checked against
    diffusers' converter in test_ldm_tables_agree_with_diffusers), plus the parts the converter ignores."""
    out = {sd.LDM_UNET + ldm: unet_sd[name] for name, ldm in sd.ldm_unet_names(unet_config).items()}
    for name, ldm in sd.ldm_vae_names(vae_config).items():
        v = vae_sd[name]
        out[sd.LDM_VAE + ldm] = v[:, :, None, None] if ".mid.attn_1." in ldm and v.ndim == 2 else v  # 1x1 convs
    rng = np.random.default_rng(5)
    out["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"] = rng.normal(
        size=(7, 8)).astype(np.float32)
    out["alphas_cumprod"] = np.linspace(1, 0.01, 10, dtype=np.float32)
    return out


@pytest.fixture(scope="module")
def sd_torch(tmp_path_factory):
    """Tiny random diffusers SD models, their outputs, a diffusers folder and two single files."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    vae = diffusers.AutoencoderKL(**TINY_VAE).eval()
    randomise_norms(unet, 1)
    randomise_norms(vae, 2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 16, 16)).astype(np.float32)
    t = np.array([10, 900])
    context = rng.normal(size=(2, 7, 32)).astype(np.float32)
    images = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    z = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(images)).latent_dist
        out = {"eps": unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy(),
               "mean": posterior.mean.numpy(), "std": posterior.std.numpy(),
               "decoded": vae.decode(torch.from_numpy(z)).sample.numpy()}
    root = tmp_path_factory.mktemp("sd")
    folder = root / "diffusers"
    unet.save_pretrained(str(folder / "unet"))  # safetensors
    vae.save_pretrained(str(folder / "vae"), safe_serialization=False)  # .bin
    scheduler = {**pretrained.SD15_SCHEDULER_CONFIG, "_class_name": "PNDMScheduler", "clip_sample": False}
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))

    unet_sd = {k: v.numpy() for k, v in unet.state_dict().items()}
    vae_sd = {k: v.numpy() for k, v in vae.state_dict().items()}
    ldm = ldm_state_dict(unet_sd, vae_sd, sd.sd_unet_config(dict(unet.config)),
                         VAEConfig.from_diffusers(dict(vae.config)))
    from safetensors.numpy import save_file

    save_file(ldm, str(root / "sd.safetensors"))
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in ldm.items()}, "global_step": 0},
               str(root / "sd.ckpt"))
    return {"root": root, "folder": folder, "inputs": (x, t, context, images, z), "out": out,
            "unet_config": dict(unet.config), "vae_config": dict(vae.config), "unet_sd": unet_sd, "vae_sd": vae_sd}


@pytest.fixture(scope="module")
def sd_out(sd_torch):
    """The `sd` CLI on the diffusers folder."""
    dst = sd_torch["root"] / "sd_out"
    assert convert_checkpoint.main(["sd", "--src", str(sd_torch["folder"]), "--dst", str(dst)]) == 0
    return dst


def check_against_diffusers(weights, sd_torch, what):
    x, t, context, images, z = sd_torch["inputs"]
    out = sd_torch["out"]
    eps = run_unet(weights.unet, nhwc(x)[:, None], t, None, context)
    (mean, std), decoded = run_vae(weights.vae, nhwc(images), nhwc(z))
    diffs = {"unet": max_diff(np.asarray(eps)[:, 0], nhwc(out["eps"])), "vae mean": max_diff(mean, nhwc(out["mean"])),
             "vae std": max_diff(std, nhwc(out["std"])), "vae decode": max_diff(decoded, nhwc(out["decoded"]))}
    print(f"{what}: max abs diffs " + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()))
    assert all(v <= TOL for v in diffs.values()), diffs


def test_folder_matches_diffusers(sd_torch, sd_out):
    weights = pretrained.load_weights(str(sd_out))
    cfg = weights.unet.config
    assert (cfg.temporal_layers, cfg.fps_conditioning, cfg.global_encoder) == (False, False, False)
    assert cfg.timestep_max_period == 10000.0 and cfg.in_channels == 4 and cfg.cross_attention_dim == 32
    assert weights.scheduler_config["_class_name"] == "PNDMScheduler"
    check_against_diffusers(weights, sd_torch, "diffusers folder")
    report = json.loads((sd_out / "conversion.json").read_text())
    assert report["kind"] == "sd" and report["layout"] == "diffusers folder"
    assert report["vae"].endswith("diffusion_pytorch_model.bin")


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_single_file_matches_diffusers(sd_torch, sd_out, fmt, tmp_path):
    configs = []
    for name in ("unet_config", "vae_config"):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(sd_torch[name]))
        configs.append(str(path))
    dst = tmp_path / "out"
    assert convert_checkpoint.main(["sd", "--src", str(sd_torch["root"] / f"sd.{fmt}"), "--unet-config", configs[0],
                                    "--vae-config", configs[1], "--dst", str(dst)]) == 0
    weights = pretrained.load_weights(str(dst))
    folder = pretrained.load_weights(str(sd_out))
    for part in ("unet", "vae"):
        got, want = flat_params(getattr(weights, part)), flat_params(getattr(folder, part))
        assert got.keys() == want.keys()
        assert all(np.array_equal(got[k], want[k]) for k in want), part
    if fmt == "safetensors":
        check_against_diffusers(weights, sd_torch, "single file")
    report = json.loads((dst / "conversion.json").read_text())
    assert report["ignored"] == {"cond_stage_model.": 1, "(top-level DDPM schedule buffers)": 1}


def test_ldm_tables_agree_with_diffusers(sd_torch):
    """Our LDM names, read back by diffusers' own single-file converter, give the original state dicts."""
    from diffusers.loaders import single_file_utils as sfu

    ldm = {k: torch.from_numpy(v) for k, v in ldm_state_dict(
        sd_torch["unet_sd"], sd_torch["vae_sd"], sd.sd_unet_config(sd_torch["unet_config"]),
        VAEConfig.from_diffusers(sd_torch["vae_config"])).items()}
    for converted, original in ((sfu.convert_ldm_unet_checkpoint(ldm, sd_torch["unet_config"]), sd_torch["unet_sd"]),
                                (sfu.convert_ldm_vae_checkpoint(ldm, sd_torch["vae_config"]), sd_torch["vae_sd"])):
        assert converted.keys() == original.keys()
        assert all(np.array_equal(converted[k].numpy(), original[k]) for k in original)
    # SD 1.5's layout: 686 UNet tensors, upsamplers after the attention where the block has one.
    names = sd.ldm_unet_names(sd.sd_unet_config(sd.SD15_UNET_CONFIG))
    assert len(set(names.values())) == len(names) == 686
    assert names["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.2.1.conv.weight"
    assert names["up_blocks.2.upsamplers.0.conv.weight"] == "output_blocks.8.2.conv.weight"
    assert names["up_blocks.3.resnets.2.conv_shortcut.weight"] == "output_blocks.11.0.skip_connection.weight"
    assert names["down_blocks.2.downsamplers.0.conv.bias"] == "input_blocks.9.0.op.bias"
    vae_names = sd.ldm_vae_names(VAEConfig.sd15())
    assert vae_names["decoder.up_blocks.0.upsamplers.0.conv.weight"] == "decoder.up.3.upsample.conv.weight"
    assert vae_names["encoder.mid_block.attentions.0.to_out.0.weight"] == "encoder.mid.attn_1.proj_out.weight"


# --- inflation -----------------------------------------------------------------------------------------


def neutralised(unet):
    """The SD UNet with its cross-attention output set to zero, as the inflation starts it."""
    flat = [(p, v.replace(jnp.zeros_like(v.get_value())) if CROSS_ATTN_OUT.search(".".join(map(str, p))) else v)
            for p, v in nnx.to_flat_state(nnx.state(unet))]
    return nnx.merge(nnx.graphdef(unet), nnx.from_flat_state(flat))


@pytest.fixture(scope="module")
def inflated(sd_out):
    dst = sd_out.parent / "m3ddm_init"
    assert convert_checkpoint.main(["inflate", "--src", str(sd_out), "--dst", str(dst), "--seed", "3"]) == 0
    return dst


def test_inflated_unet_reproduces_sd(sd_out, inflated):
    """The identity property of m3ddm_jax.convert.inflate: on F identical frames, with any extra input
    channels, fps and global tokens, every output frame is the (neutralised) SD UNet's output."""
    sd_unet = pretrained.load_weights(str(sd_out)).unet
    unet = pretrained.load_weights(str(inflated)).unet
    cfg = unet.config
    assert cfg == inflate.inflated_config(sd_unet.config)
    assert (cfg.in_channels, cfg.cross_attention_dim, cfg.timestep_max_period) == (9, 320, 10000.0)
    rng = np.random.default_rng(1)
    b, f = 2, 3
    x = rng.normal(size=(b, 1, 16, 16, 4)).astype(np.float32)
    extra = rng.normal(size=(b, f, 16, 16, 5)).astype(np.float32)
    sample = np.concatenate([np.repeat(x, f, axis=1), extra], axis=-1)
    t = np.array([10, 900])
    want = run_unet(neutralised(sd_unet), x, t, None, rng.normal(size=(b, 7, 32)).astype(np.float32))
    assert float(jnp.std(want)) > 0.1
    for fps, tokens in ((np.array([3, 27]), rng.normal(size=(b, 10, 320))),
                        (np.array([8, 8]), 5 * rng.normal(size=(b, 10, 320)))):  # one token length: one compile
        got = run_unet(unet, sample, t, fps, tokens.astype(np.float32))
        diff = max_diff(got, np.repeat(np.asarray(want), f, axis=1))
        print(f"inflated vs SD, fps {fps}: max abs diff {diff:.2g}")
        assert diff <= 1e-5


def test_inflation_init_and_report(inflated):
    unet = pretrained.load_weights(str(inflated)).unet
    params = flat_params(unet)
    c0 = unet.config.block_out_channels[0]
    assert np.array_equal(params["conv_in.kernel"][..., 4:, :], np.zeros((3, 3, 5, c0)))
    for name, value in params.items():
        if name.endswith("temporal_conv.kernel"):
            assert np.array_equal(value[1], np.eye(value.shape[-1])) and not value[0].any() and not value[2].any()
        if re.search(r"(proj_out2|fps_emb_proj)\.|temporal_conv\.bias|" + CROSS_ATTN_OUT.pattern, name):
            assert not value.any(), name
        if re.search(r"transformer_blocks\.0\.attn2\.to_[kv]\.kernel", name):
            assert value.shape[0] == 320 and abs(value.std() * np.sqrt(320) - 1) < 0.1  # lecun normal
        if name.startswith("global_img_encoder") and name.endswith((".mean", ".var")):
            assert np.array_equal(value, np.full_like(value, name.endswith(".var")))
    report = json.loads((inflated / "conversion.json").read_text())
    assert report["kind"] == "inflate" and report["property"] == inflate.IDENTITY_PROPERTY
    inits = {(e["category"], e["init"]) for e in report["tensors"]}
    assert ("new:temporal_transformer", "zero") in inits and ("same_name_changed_shape", "copy_widen_inputs") in inits
    assert sum(row["tensors"] for row in report["summary"].values()) == len(params)


def test_zero_started_layers_get_gradients(inflated):
    """The zero-started outputs (proj_out2, fps_emb_proj, cross-attention to_out) have a gradient at
    initialisation, so the new layers train from the first step; the layers behind them get theirs once
    those move."""
    unet = pretrained.load_weights(str(inflated)).unet
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(1, 3, 4, 4, 64)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(1, 128)), jnp.float32)
    tokens = jnp.asarray(rng.normal(size=(1, 5, 320)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def loss(block):
        y = block.resnets[0](x, emb, emb)
        return jnp.sum(block.attentions[0](y, tokens) * weights)

    grads = flat_params(nnx.jit(nnx.grad(loss))(unet.mid_block))
    for name in ("resnets.0.fps_emb_proj.kernel", "attentions.0.proj_out2.kernel",
                 "attentions.0.transformer_blocks.0.attn2.to_out.kernel"):
        assert np.abs(grads[name]).max() > 1e-3, name
    assert not grads["attentions.0.transformer_blocks2.0.ff.out.kernel"].any()  # behind proj_out2 = 0


@pytest.mark.reference
def test_full_size_inflation_matches_manifest(reference_dir):
    """SD 1.5, inflated abstractly (shape-only models), is the released M3DDM architecture, and every
    tensor of the SD-1.5 correspondence table gets its category and SD counterpart."""
    summary = json.loads((reference_dir / "param_manifest_full_summary.json").read_text())
    sd15 = sd.sd_unet_config(summary["sd15_config_used"])
    abstract_sd = m3ddm.abstract_unet(sd15)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract_sd))) == summary["sd15_unet2d_num_parameters"]
    config = inflate.inflated_config(sd15)
    assert config == UNet3DConfig(timestep_max_period=10000.0)  # the released model, with SD's sinusoid

    with open(reference_dir / "param_manifest_full.tsv") as f:
        shapes = {r["name"]: tuple(json.loads(r["shape"])) for r in csv.DictReader(f, delimiter="\t")}
    m3ddm.check_unet_shapes(config, shapes)  # raises, listing every problem, on any mismatch

    entries = {e.m3ddm: e for e in inflate.inflation_plan(sd15, config)}
    assert {e.m3ddm for e in entries.values()} | {k for k in shapes if k.endswith("num_batches_tracked")} == set(
        shapes)
    with open(reference_dir / "param_correspondence_sd15.tsv") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if not r["m3ddm_name"].endswith("num_batches_tracked")]
    assert {r["m3ddm_name"] for r in rows} == set(entries)
    for r in rows:
        e = entries[r["m3ddm_name"]]
        assert (e.category, e.sd or "") == (r["category"], r["sd15_name"]), r
        if e.sd:
            leaf = str(e.path[-1])
            assert mapping.flax_shape_of(json.loads(r["sd15_shape"]), leaf, len(e.sd_shape)) == e.sd_shape


# --- bad input -----------------------------------------------------------------------------------------


def test_missing_component_folder(sd_torch, tmp_path):
    import shutil

    shutil.copytree(sd_torch["folder"] / "unet", tmp_path / "unet")
    with pytest.raises(FileNotFoundError, match=r"no vae/ folder"):
        sd.load_stable_diffusion(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such folder or file"):
        sd.load_stable_diffusion(str(tmp_path / "missing"))


def test_unknown_layout_and_other_models(sd_torch, tmp_path):
    from safetensors.numpy import save_file

    tensor = np.zeros((2, 2), np.float32)
    cases = {"unknown": ({"encoder.weight": tensor, "head.bias": tensor[0]}, r"unknown key layout.*encoder\.\* \(1\)"),
             "sdxl": ({"conditioner.embedders.0.x": tensor, "model.diffusion_model.x": tensor}, "SDXL"),
             "vae_only": ({"first_stage_model.x": tensor}, r"no model\.diffusion_model\.\* \(UNet\) keys"),
             "extra": ({"model.diffusion_model.x": tensor, "first_stage_model.x": tensor, "lora_unet.x": tensor},
                       r"does not have: lora_unet\.\*")}
    for name, (state, message) in cases.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ValueError, match=message):
            sd.load_stable_diffusion(str(tmp_path / f"{name}.safetensors"))
    # A tiny SD file read with the default (SD 1.5) config: every mismatch is named, and so is the config.
    with pytest.raises(CheckpointMismatchError, match=r"Stable Diffusion 1\.5 \(assumed\)[\s\S]*conv_in\.weight"):
        sd.load_stable_diffusion(str(sd_torch["root"] / "sd.safetensors"))


@pytest.mark.parametrize("change, message", [
    ({"_class_name": "UNet3DConditionModel"}, "'UNet3DConditionModel'"),
    ({"attention_head_dim": [5, 10], "use_linear_projection": True}, "use_linear_projection=True"),
    ({"addition_embed_type": "text_time"}, "addition_embed_type='text_time'"),
    ({"down_block_types": ["CrossAttnDownBlock3D", "DownBlock2D"]}, "CrossAttnDownBlock3D"),
    ({"motion_layers": 1}, "unknown key 'motion_layers'"),
])
def test_non_sd_unet_config(sd_torch, change, message):
    with pytest.raises(ValueError, match=r"not a Stable Diffusion 1\.x UNet config.*" + re.escape(message)):
        sd.sd_unet_config({**sd_torch["unet_config"], **change})


def test_inflate_rejects_bad_input(sd_out, inflated, tmp_path, capsys):
    bad = tmp_path / "override.json"
    bad.write_text(json.dumps({"attention_heads": 4}))
    assert convert_checkpoint.main(["inflate", "--src", str(sd_out), "--config", str(bad),
                                    "--dst", str(tmp_path / "x")]) == 1
    assert "attention_heads=4 but the SD UNet has 2" in capsys.readouterr().err
    unet3d = pretrained.load_weights(str(inflated)).unet
    with pytest.raises(ValueError, match="not a 2D"):
        inflate.inflation_plan(unet3d.config, unet3d.config)
