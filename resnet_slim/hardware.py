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


def int8_out_multiple(flags: set[str] | None = None) -> int:
    """The output-channel multiple onnxruntime's fast symmetric INT8 conv needs on this CPU.

    MLAS `convsym.cpp` (`MlasConvSymPackWSize`) packs output channels in blocks of 4 on AVX-512
    and of 8 on AVX2 / AVX-VNNI; a conv that does not fit falls back to im2col + QGEMM, which at
    CIFAR sizes is 2x slower for the same MACs (../shared/FACTS.md).
    """
    flags = cpu_info()[1] if flags is None else flags
    return 4 if {"avx512f", "avx512bw"} <= flags else 8


def fast_int8_conv(in_channels: int, out_channels: int, flags: set[str] | None = None) -> bool:
    """Whether onnxruntime runs this conv (weight zero-point 0, as our QDQ builds have) with its
    fast symmetric INT8 kernel: in % 4 == 0, out % 4 or 8 (see int8_out_multiple), out >= 16."""
    multiple = int8_out_multiple(flags)
    return in_channels % 4 == 0 and out_channels % multiple == 0 and out_channels >= 16


def fast_int8_widths(widest: int, flags: set[str] | None = None) -> list[int]:
    """Every channel count up to `widest` that is a fast INT8 conv's output and the next conv's
    input: the widths a latency-aware pruner may choose from (empty below 16)."""
    multiple = int8_out_multiple(flags)
    return [w for w in range(16, widest + 1, multiple) if fast_int8_conv(w, w, flags)]
