"""Where a number was measured: the CPU, its cores and the SIMD flags INT8 speed depends on.

Free of onnxruntime sessions and models, so quantization (reduce_range "auto") and every stage
that records a fingerprint can use it without importing the benchmark.
"""

import os
import platform
from pathlib import Path

import onnxruntime as ort
import torch

from resnet_slim.limits import usable_cores


def cpu_info() -> tuple[str, set[str]]:
    """(CPU model name, its feature flags) from /proc/cpuinfo; empty flags elsewhere."""
    cpu_model, flags = platform.processor() or "unknown", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and cpu_model in ("unknown", "", "x86_64"):
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    return cpu_model, flags


def has_int8_dot_product() -> bool:
    """VNNI (AVX-512 or AVX) accumulates u8*s8 products in int32; without it x86 uses int16
    pairs."""
    _, flags = cpu_info()
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def hardware_fingerprint() -> dict:
    """Where the numbers were measured: CPU model, cores, the SIMD flags INT8 speed depends on."""
    cpu_model, flags = cpu_info()
    return {
        "cpu": cpu_model,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
