"""m3ddm_jax: JAX/Flax M3DDM video outpainting. Pins are the versions this project is tested with."""

from setuptools import find_packages, setup

INSTALL = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "absl-py",
    "av==18.1.0",
    "safetensors==0.8.0",
    "numpy",
    "opencv-python-headless",
    "tqdm",
    "tensorboardX",
]

# PyTorch is needed only to read pickled checkpoints and, in tests, as the numerical reference.
# Pinned exactly: an unpinned torch pulls several GB of CUDA wheels.
TORCH = ["torch==2.13.0"]

# libtpu, at the version this jax pins: TPU runs, and ahead-of-time compilation for TPU slices on any machine
# (tools/aot_compile.py). Without a TPU everything still runs on the CPU.
TPU = ["jax[tpu]==0.10.2"]

setup(
    name="m3ddm_jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of M3DDM (hierarchical masked 3D diffusion for video outpainting)",
    packages=find_packages(include=["m3ddm_jax", "m3ddm_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL,
    extras_require={
        "torch": TORCH,
        "tpu": TPU,
        "test": TORCH + [
            "diffusers==0.42.1",
            "transformers==5.24.0",
            "pytest",
            "pytest-xdist",
            "scikit-image",
            "scipy",
        ],
    },
)
