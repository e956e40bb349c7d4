"""What a measurement or a build ran on: library versions and the processor, recorded beside
figures that depend on them (dataset manifests, eval results, benchmark output), so that a
number that does not reproduce can be traced to a different torch or CPU."""

from __future__ import annotations

import os
import platform
import sys
from functools import lru_cache

import numpy
import torch
import transformers


@lru_cache(maxsize=1)
def _cpu_model() -> str:
    """The processor's name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict[str, str | int]:
    """Versions, processor, visible CPUs, torch's thread count and the CUDA device (if any)."""
    env: dict[str, str | int] = {
        "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
        "numpy": numpy.__version__, "platform": f"{platform.system()} {platform.machine()}",
        "cpu": _cpu_model(), "cpus_visible": os.cpu_count() or 0, "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
    return env


def summary() -> str:
    """describe() in one line."""
    e = describe()
    line = (f"{e['platform']} ({e['cpu']}), {e['cpus_visible']} CPUs visible, torch {e['torch']}, "
            f"transformers {e['transformers']}, python {e['python']}")
    return line + (f", CUDA {e['cuda_device']}" if "cuda_device" in e else "")
