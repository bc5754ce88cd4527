"""The masked-frame objective: a batch of clips and masks -> UNet inputs -> epsilon MSE.

Batch contract (host arrays; B clips of F frames, G global frames, pixel size H x W):

    frames          (B, F, H, W, 3) uint8    the clip
    global_frames   (B, G, H, W, 3) uint8    frames spread over the whole video
    fps             (B,) float32             the clip's effective fps
    mask            (B, H, W) float32        the outpainting mask, 1 = to generate, one per clip
    given           (B, F) bool              guide frames: shown whole (mask 0), as inference's guides
    global_masked   (B, G) bool              global frames inside the clip, masked like the clip
    drop_local      (B,) bool                CFG dropout of the local context
    drop_global     (B,) bool                CFG dropout of the global context

Conditioning mirrors inference exactly. The conditioning latent of a frame is the latent of the frame
with the masked region painted black (-1), and the mask channel is the pixel mask sampled at the top-left
of each latent cell (the official nearest rule). A given (guide) frame has its clean latent and mask 0.
With local dropout the context becomes the unconditional one of inference: the black-frame latent with an
all-ones mask, guide frames kept as they are, as the sampler keeps them in both branches. With global
dropout the global latents are zeros, so the tokens are the encoder applied to zero latents, as inference's
unconditional global context.

From a latent cache the batch holds posterior `latent_mean`/`latent_std` (and `global_*`) of the unmasked
frames instead of pixels, so the masked condition is formed in latent space: masked latent cells take the
black-frame latent. That approximates encoding the black-painted frame (the VAE's receptive field blurs
the border), the price of never running the encoder during training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m3ddm_jax.diffusion.noise_schedule import NoiseSchedule
from m3ddm_jax.models.unet3d import UNet3D
from m3ddm_jax.models.vae import LatentCodec
from m3ddm_jax.video.canvas import latent_mask, to_model_range


def _posterior_sample(codec: LatentCodec, mean, std, key) -> jax.Array:
    return (mean + std * jax.random.normal(key, mean.shape, jnp.float32)) * codec.config.scaling_factor


def chunk_frames(frames_per_call: int, frames: int) -> int:
    """The frames per VAE call that `frames_per_call` (config.vae_frames_per_call) gives a set of `frames`."""
    k = min(frames_per_call, frames) or frames
    if frames_per_call < 0 or frames % k:
        raise ValueError(f"vae_frames_per_call={frames_per_call} does not divide the {frames} frames of a clip; use "
                         f"a divisor of the clip and global frame counts (0: one call)")
    return k


def encode_frames(codec: LatentCodec, frames: jax.Array, key: jax.Array, frames_per_call: int = 0) -> jax.Array:
    """(B, F, H, W, 3) in [-1, 1] -> (B, F, h, w, C) scaled posterior samples.

    `frames_per_call` k (0: F; above F: F; else a divisor of F) encodes k frames of every clip per VAE call,
    one call after the other: the encoder's full-resolution activations are the largest temporaries of a
    train step (10 GiB per v5e chip for one clip at 256 x 256 with each of its three frame sets in one
    call), and they grow with the frames of a call. The clips' axis stays whole in every call, so its
    sharding over the mesh is untouched. The posterior draws are those of a single call (one normal draw
    from `key` over all frames)."""
    b, f = frames.shape[:2]
    k = chunk_frames(frames_per_call, f)
    chunks = frames.reshape(b, f // k, k, *frames.shape[2:]).swapaxes(0, 1)  # (F/k, B, k, H, W, 3)

    def encode(x):
        mean, std = codec.encode(x.reshape(b * k, *x.shape[2:]))
        return mean.reshape(b, k, *mean.shape[1:]), std.reshape(b, k, *std.shape[1:])

    mean, std = jax.lax.map(encode, chunks)
    mean, std = (y.swapaxes(0, 1).reshape(b * f, *y.shape[3:]) for y in (mean, std))
    z = _posterior_sample(codec, mean, std, key)  # codec.encode_to_latents(frames, key=key)'s draws
    return z.reshape(b, f, *z.shape[1:])


def _pixel_masks(batch: dict) -> tuple[jax.Array, jax.Array]:
    """(B, F, H, W) float, 1 where a clip frame is generated (0 throughout the given frames), and
    (B, G, H, W) bool, where a global frame is masked."""
    mask = batch["mask"].astype(jnp.float32)
    clip = mask[:, None] * (1.0 - batch["given"][:, :, None, None].astype(jnp.float32))
    return clip, batch["global_masked"][:, :, None, None] & (mask[:, None] > 0)


def inputs_from_pixels(codec: LatentCodec, batch: dict, k_clip, k_masked, k_global, frames_per_call: int = 0) -> dict:
    """The UNet inputs before CFG dropout from the batch's frames: masked regions are painted black, then
    encoded (`frames_per_call`: encode_frames)."""
    clip, masked_global = _pixel_masks(batch)
    frames = to_model_range(batch["frames"])
    x0 = encode_frames(codec, frames, k_clip, frames_per_call)
    cond = encode_frames(codec, jnp.where(clip[..., None] > 0, -1.0, frames), k_masked, frames_per_call)
    global_frames = jnp.where(masked_global[..., None], -1.0, to_model_range(batch["global_frames"]))
    return {"x0": x0, "cond": cond, "mask": latent_mask(clip, clip.shape[2] // x0.shape[2])[..., None],
            "global_latents": encode_frames(codec, global_frames, k_global, frames_per_call)}


def inputs_from_cache(codec: LatentCodec, batch: dict, black: jax.Array, k_clip, k_global) -> dict:
    """The UNet inputs before CFG dropout from the batch's cached posteriors: masked latent cells take
    `black`, the black frame's latent."""
    clip, masked_global = _pixel_masks(batch)
    x0 = _posterior_sample(codec, batch["latent_mean"], batch["latent_std"], k_clip)
    factor = clip.shape[2] // x0.shape[2]
    m = latent_mask(clip, factor)[..., None]
    g = _posterior_sample(codec, batch["global_latent_mean"], batch["global_latent_std"], k_global)
    return {"x0": x0, "cond": jnp.where(m > 0, black, x0), "mask": m,
            "global_latents": jnp.where(latent_mask(masked_global, factor)[..., None], black, g)}


def unet_inputs(codec: LatentCodec, batch: dict, key: jax.Array, frames_per_call: int = 0) -> dict:
    """Clean latents, conditioning latents, latent mask and global latents for a batch (no gradients): from
    its cached posteriors when it holds them, else from its frames (`frames_per_call`: encode_frames); then
    the CFG dropout."""
    k_clip, k_masked, k_global, k_black = jax.random.split(key, 4)
    black = codec.encode_to_latents(jnp.full((1, *batch["mask"].shape[1:], 3), -1.0), key=k_black)[0]
    if "latent_mean" in batch:
        inputs = inputs_from_cache(codec, batch, black, k_clip, k_global)
    else:
        inputs = inputs_from_pixels(codec, batch, k_clip, k_masked, k_global, frames_per_call)
    drop = batch["drop_local"][:, None, None, None, None] & ~batch["given"][:, :, None, None, None]
    inputs["cond"] = jnp.where(drop, black, inputs["cond"])
    inputs["mask"] = jnp.where(drop, 1.0, inputs["mask"])
    inputs["global_latents"] = jnp.where(batch["drop_global"][:, None, None, None, None], 0.0,
                                         inputs["global_latents"])
    return jax.lax.stop_gradient(inputs)


LOSS_WEIGHTINGS = ("uniform", "min_snr")


def loss_weights(schedule: NoiseSchedule, t: jax.Array, weighting: str = "uniform",
                 snr_gamma: float = 5.0) -> jax.Array:
    """Per-example weights of the prediction MSE at timesteps t. 'uniform': 1 (the paper's plain MSE).
    'min_snr': Min-SNR-gamma (Hang et al. 2023), the x0-error weight min(SNR, gamma) expressed in the
    prediction's units: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v. It stops the
    many nearly noise-free timesteps, whose targets are easy, from dominating the gradient."""
    if weighting == "uniform":
        return jnp.ones(jnp.shape(t), jnp.float32)
    if weighting != "min_snr":
        raise ValueError(f"loss weighting {weighting!r}: expected one of {LOSS_WEIGHTINGS}")
    snr = schedule.snr(t)
    return jnp.minimum(snr, snr_gamma) / (snr + 1.0 if schedule.prediction_type == "v_prediction" else snr)


def predict(unet: UNet3D, schedule: NoiseSchedule, inputs: dict, fps: jax.Array, t: jax.Array,
            noise: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x_t, the UNet's prediction) for the clean latents of `inputs` noised with `noise` at timesteps t."""
    x0 = inputs["x0"]
    xt = schedule.add_noise(x0, noise, t)
    g = inputs["global_latents"]
    tokens = unet.encode_global(g.reshape(-1, *g.shape[2:]), x0.shape[0])
    return xt, unet(jnp.concatenate([xt, inputs["cond"], inputs["mask"]], axis=-1), t, fps, tokens)


def _per_example(x: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(x), axis=tuple(range(1, x.ndim)))


def loss(unet: UNet3D, schedule: NoiseSchedule, inputs: dict, fps: jax.Array, key: jax.Array, *,
         weighting: str = "uniform", snr_gamma: float = 5.0) -> jax.Array:
    """The prediction MSE (epsilon or v, the schedule's prediction_type) at a uniformly drawn timestep per
    clip (DDPM forward process), weighted per clip by `loss_weights`."""
    x0 = inputs["x0"]
    k_t, k_noise = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    _, out = predict(unet, schedule, inputs, fps, t, noise)
    errors = _per_example(out - schedule.training_target(x0, noise, t))
    return jnp.mean(loss_weights(schedule, t, weighting, snr_gamma) * errors)


def noise_error(unet: UNet3D, schedule: NoiseSchedule, inputs: dict, fps: jax.Array, t: jax.Array,
                noise: jax.Array) -> jax.Array:
    """Per clip, the MSE of the noise the prediction implies: the paper's epsilon loss, for any
    prediction_type, so that runs with other parameterisations and weightings compare (validation)."""
    xt, out = predict(unet, schedule, inputs, fps, t, noise)
    return _per_example(schedule.predicted_noise(xt, out, t) - noise)
