"""AutoencoderKL: parity with the official pipeline fixtures and with diffusers' PyTorch model, and bad input."""

import dataclasses
import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import load_json
from m3ddm_jax.convert.mapping import CheckpointMismatchError
from m3ddm_jax.convert.sources import open_state_dict
from m3ddm_jax.convert.vae import load_vae_folder, vae_from_torch
from m3ddm_jax.models.vae import VAEConfig

TOL = 1e-4
RUNS = load_json("pipeline_runs.json") or {}
TINY = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)


@nnx.jit
def encode(vae, images):
    return vae.encode(images)


@nnx.jit
def decode(vae, z):
    return vae.decode(z)


@nnx.jit
def to_latents(vae, images, key=None, eps=None):
    return vae.encode_to_latents(images, key=key, eps=eps)


def assert_close(got, want, what, tol=TOL):
    diff = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol:.0e}"


def frames_last(x, b):
    """Official '(b c) f h w' or 'b c f h w' -> our (b*f, h, w, c)."""
    x = np.asarray(x)
    x = x.reshape(b, -1, *x.shape[-3:])  # (b, c, f, h, w)
    return x.transpose(0, 2, 3, 4, 1).reshape(-1, *x.shape[-2:], x.shape[1])


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


# --- official pipeline fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_vae(reference_dir):
    config = VAEConfig.from_diffusers(json.loads((reference_dir / RUNS.get("vae_config", "vae_config.json"))
                                                 .read_text()))
    return vae_from_torch(open_state_dict(str(reference_dir / RUNS.get("vae_weights", "vae_tiny.safetensors"))),
                          config)


@pytest.mark.reference
@pytest.mark.parametrize("case", sorted(RUNS.get("runs", {})))
def test_reference_encode(reference_vae, reference_dir, case):
    run = RUNS["runs"][case]
    d = np.load(reference_dir / run["file"])
    b = run["unet_call_kwargs"]["b"]
    ori, masked = frames_last(d["ori_image"], b), frames_last(d["mask_image"], b)
    encodes = {
        # Pipeline step 1: one encode of [ori frames, masked frames, one all -1 image]; ori come first.
        "local": (np.concatenate([ori, masked, -np.ones_like(ori[:1])]),
                  {"ori_latents": frames_last(d["ori_latents"], b)}),
        # Step 6: the global frames; the UNet receives their latents as encoder_hidden_states.
        "global": (nhwc(d["global_frames"]),
                   {"unet_step0_encoder_hidden_states": nhwc(d["unet_step0_encoder_hidden_states"])}),
    }
    for name, (images, recorded) in encodes.items():
        mean, std = encode(reference_vae, images)
        assert_close(mean, nhwc(d[f"posterior_mean_{name}"]), f"{case} posterior_mean_{name}")
        assert_close(std, nhwc(d[f"posterior_std_{name}"]), f"{case} posterior_std_{name}")
        latents = to_latents(reference_vae, images, eps=nhwc(d[f"rand_vae_posterior_eps_{name}"]))
        for key, want in recorded.items():
            assert_close(latents[:len(want)], want, f"{case} {key}")


@pytest.mark.reference
@pytest.mark.parametrize("case", sorted(RUNS.get("runs", {})))
def test_reference_decode(reference_vae, reference_dir, case):
    run = RUNS["runs"][case]
    d = np.load(reference_dir / run["file"])
    b = run["unet_call_kwargs"]["b"]
    # The decoder input is already unscaled: out_latents / scaling_factor (pipeline step 8).
    np.testing.assert_allclose(frames_last(d["out_latents"], b) / reference_vae.config.scaling_factor,
                               nhwc(d["vae_decode_input"]), rtol=1e-6, atol=1e-5)
    images = np.clip(decode(reference_vae, nhwc(d["vae_decode_input"])) / 2 + 0.5, 0, 1)
    assert_close(images, np.asarray(d["out_images"]).reshape(images.shape), f"{case} out_images")


# --- diffusers' PyTorch AutoencoderKL --------------------------------------------------------------

LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def legacy_names(sd):
    """diffusers key -> the pre-0.14 mid-block attention naming (query/key/value/proj_attn)."""
    pattern = re.compile(r"^(.*\.attentions\.\d+\.)(to_q|to_k|to_v|to_out\.0)\.")
    return {pattern.sub(lambda m: m[1] + LEGACY[m[2]] + ".", k): v for k, v in sd.items()}


@pytest.fixture(scope="module")
def torch_vae(reference_dir):
    """A random diffusers AutoencoderKL of the fixture's config, its state dict and outputs on tiny inputs."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    config = json.loads((reference_dir / "vae_config.json").read_text())
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms away from identity, so a swapped scale/bias cannot pass
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    z = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(images)).latent_dist
        out = {"images": images, "z": z, "mean": posterior.mean.numpy(), "std": posterior.std.numpy(),
               "decoded": model.decode(torch.from_numpy(z)).sample.numpy()}
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    return VAEConfig.from_diffusers(config), state_dict, out


@pytest.mark.parametrize("naming", ["diffusers", "legacy"])
def test_matches_diffusers(torch_vae, naming):
    config, sd, out = torch_vae
    if naming == "legacy":
        sd = legacy_names(sd)
        assert "encoder.mid_block.attentions.0.proj_attn.weight" in sd
    vae = vae_from_torch(sd, config)
    mean, std = encode(vae, nhwc(out["images"]))
    assert_close(mean, nhwc(out["mean"]), f"{naming} posterior mean")
    assert_close(std, nhwc(out["std"]), f"{naming} posterior std")
    assert_close(decode(vae, nhwc(out["z"])), nhwc(out["decoded"]), f"{naming} decode")


# --- sampling, dtype and config --------------------------------------------------------------------


def test_encode_to_latents_sampling(torch_vae):
    config, sd, out = torch_vae
    vae, images = vae_from_torch(sd, config), nhwc(out["images"])
    mean, std = encode(vae, images)
    key = jax.random.key(3)
    eps = jax.random.normal(key, mean.shape)
    sf = config.scaling_factor
    assert_close(to_latents(vae, images), mean * sf, "posterior mean", tol=1e-6)
    assert_close(to_latents(vae, images, key=key), (mean + std * eps) * sf, "keyed draw", tol=1e-6)
    assert_close(nnx.jit(lambda m, x: m.decode_latents(x))(vae, mean * sf), decode(vae, mean), "decode_latents",
                 tol=1e-5)
    with pytest.raises(ValueError, match="either key or eps"):
        vae.encode_to_latents(images, key=key, eps=eps)


def test_bfloat16_compute_keeps_float32_params(torch_vae):
    config, sd, out = torch_vae
    vae = vae_from_torch(sd, dataclasses.replace(config, dtype="bfloat16"))
    params = jax.tree.leaves(nnx.state(vae, nnx.Param))
    assert {p.dtype for p in params} == {np.dtype("float32")}
    mean, _ = encode(vae, nhwc(out["images"]))
    assert mean.dtype == np.float32
    assert_close(mean, nhwc(out["mean"]), "bfloat16 posterior mean", tol=0.05 * float(np.abs(out["mean"]).max()))


def test_config_round_trip():
    assert VAEConfig.from_diffusers(TINY.to_diffusers()) == TINY
    assert VAEConfig.from_diffusers(TINY.to_diffusers(), dtype="bfloat16").dtype == "bfloat16"
    assert VAEConfig.sd15().to_diffusers()["block_out_channels"] == [128, 256, 512, 512]


@pytest.mark.parametrize("change, message", [
    ({"down_block_types": ["DownEncoderBlock2D", "CrossAttnDownBlock2D"]}, "CrossAttnDownBlock2D"),
    ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types"),
    ({"act_fn": "gelu"}, "act_fn='gelu'"),
    ({"use_quant_conv": False}, "use_quant_conv=False"),
    ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
    ({"attention_head_dim": 8}, "unknown key 'attention_head_dim'"),
])
def test_config_rejects_unsupported(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        VAEConfig.from_diffusers({**TINY.to_diffusers(), **change})


def test_load_vae_folder(torch_vae, tmp_path):
    from safetensors.numpy import save_file

    config, sd, _ = torch_vae
    (tmp_path / "config.json").write_text(json.dumps(config.to_diffusers()))
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    loaded, vae = load_vae_folder(str(tmp_path), dtype="bfloat16")
    assert loaded == dataclasses.replace(config, dtype="bfloat16")
    np.testing.assert_array_equal(vae.decoder.conv_in.kernel.value,
                                  sd["decoder.conv_in.weight"].transpose(2, 3, 1, 0))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae_folder(str(tmp_path / "missing"))


def test_checkpoint_missing_key(torch_vae):
    config, sd, _ = torch_vae
    sd = {k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: decoder\.conv_out\.bias"):
        vae_from_torch(sd, config)


def test_checkpoint_wrong_shape(torch_vae):
    config, sd, _ = torch_vae
    sd = {**sd, "encoder.conv_in.weight": np.zeros((8, 3, 5, 5), np.float32)}
    with pytest.raises(CheckpointMismatchError, match=r"encoder\.conv_in\.weight \(checkpoint \(8, 3, 5, 5\)"):
        vae_from_torch(sd, config)


def test_checkpoint_with_both_attention_namings(torch_vae):
    config, sd, _ = torch_vae
    sd = {**sd, **legacy_names({k: v for k, v in sd.items() if k.endswith("to_q.weight")})}
    with pytest.raises(ValueError, match=r"both .*to_q\.weight.* and .*query\.weight"):
        vae_from_torch(sd, config)
