"""One-line description of the machine a benchmark ran on (printed with every result table)."""

from __future__ import annotations

import math
import os
import platform

import numpy as np
import torch


def machine_description() -> str:
    """One line describing CPU, memory and software versions."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        ram_gib = math.nan
    import sklearn

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {ram_gib:.0f} GiB RAM, {gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), numpy {np.__version__}, "
            f"scikit-learn {sklearn.__version__}")
