"""Which accelerators the machine has, and JAX's platform default where it has none.

With the `tpu` extra installed, JAX starts libtpu's TPU backend in every process, also on a machine without
a TPU. There it fails after printing initialisation warnings ("Failed to find host bounds ...",
"unexpected worker hostname ...") and takes libtpu's process lock, which the next libtpu user (the
ahead-of-time compiler) then finds held. Where nothing but the CPU can serve, the package therefore sets
JAX_PLATFORMS=cpu when it is imported, before any backend starts: which changes nothing but the noise.
Ahead-of-time compilation for TPU slices loads libtpu by itself and is not affected.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPUs (and some Google virtual NICs: then we assume a TPU may be present)


def accelerator_attached() -> bool:
    """Whether a TPU (a Google PCI device, /dev/accel*, /dev/vfio/N) or a GPU (/dev/nvidia*, /dev/kfd) may be
    present. Errs towards yes."""
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(path) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or glob.glob("/dev/nvidia[0-9]*")
                or os.path.exists("/dev/kfd"))


def default_to_cpu() -> None:
    """JAX_PLATFORMS=cpu if libtpu is installed, no accelerator is attached and the user chose no platforms."""
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None or accelerator_attached():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"  # also for subprocesses (data workers, multi-process jobs)
    if "jax" in sys.modules:  # imported before this package: it has read the environment already
        sys.modules["jax"].config.update("jax_platforms", "cpu")
