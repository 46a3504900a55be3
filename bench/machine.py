"""Facts about the machine a benchmark ran on, for bench/RESULTS.md (shared by the bench scripts)."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Dict

import torch


def machine_facts(device: torch.device) -> Dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    import monai
    import monailabel

    facts = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": f"{cpu}, {os.cpu_count()} logical CPUs ({usable} usable), torch threads {torch.get_num_threads()}",
        "software": f"python {platform.python_version()}, torch {torch.__version__}, monai {monai.__version__}, "
        f"monailabel {monailabel.__version__}",
        "device": device.type,
    }
    if device.type == "cuda":
        facts["device"] = f"cuda: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        facts["device"] = f"cpu: {cpu}"
    return facts
