"""The paper's benchmark on DAVIS: horizontal outpainting at mask ratios 0.25 and 0.66 (see m3ddm_jax/evaluate.py
for the exact protocol). Paths are placeholders; set them on the command line:

    python -m m3ddm_jax.evaluate --config configs/eval_davis.py \\
        --config.videos=DAVIS/JPEGImages/480p --config.weights=weights/m3ddm --config.output_dir=eval/davis \\
        --config.metrics.lpips_lin=lpips/weights/v0.1/alex.pth --config.metrics.alexnet=alexnet-owt-7be5be79.pth \\
        --config.metrics.i3d=i3d_pretrained_400.pt

To score another method instead: --config.weights='' --config.predictions=DIR (DIR/0.25/<video>, DIR/0.66/<video>).
"""

import ml_collections

from m3ddm_jax.sampling.settings import SamplerSettings


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.videos = "DAVIS/JPEGImages/480p"  # one sub-folder of frames per video, or video files
    c.output_dir = "eval/davis"
    c.weights = "weights/m3ddm"  # a converted weights folder (tools/convert_checkpoint.py) ...
    c.predictions = ""  # ... or a folder of another method's results: <ratio>/<video>
    c.mask_ratios = (0.25, 0.66)
    # 256x256: the model's training resolution, where the 'native' and 'official' canvases coincide and the
    # canvas holds the masked frame pixel for pixel; () keeps the source size (odd sides cropped by one).
    c.frame_size = (256, 256)
    c.max_frames = 0  # 0: every frame
    c.fps = 24.0  # frame rate of frame folders (the model's fps condition); video files carry their own
    c.save_outputs = False  # also write the generated frames as PNGs under output_dir/outputs/<ratio>/<video>
    # The official sampler settings on the native canvas (m3ddm_jax/sampling/settings.py).
    c.sampler = ml_collections.ConfigDict(SamplerSettings(canvas_mode="native").to_dict())
    c.metrics = ml_collections.ConfigDict({
        "lpips_lin": "",  # the lpips package's weights/v0.1/alex.pth; empty: LPIPS skipped
        "alexnet": "",  # torchvision's AlexNet state dict (alexnet-owt-7be5be79.pth)
        "i3d": "",  # a pytorch_i3d Kinetics-400 RGB state dict; empty: FVD skipped
        "batch": 8,  # frames per metric call
    })
    return c
