"""Caps on sizes and counts that turn into allocations or OS resources, and this machine's cores.

Shared by the params schema, the checkpoint loader, prepare and the benchmark, and free of heavy
imports, so the lightest process (a converter subprocess, `--help`) can use them.
"""

import os


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container or taskset may limit
    it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# A typo (width: 1000000, threads: 1000000) must be one line, not a 1.4 TB allocation or
# libgomp's "Out of memory" minutes later. Each is far above any setting this CPU pipeline is for.
MAX_SEED = 2**32 - 1  # numpy's RandomState / SeedSequence take 32-bit seeds
MAX_WIDTH = 256  # ResNet first-stage channels: 4x the standard 64 (ResNet-50: ~400M params, 1.6 GB)
MAX_THREADS = 1024  # intra-op threads: more than the hardware threads of any 2-socket server
MAX_NPROC = 64  # training processes on one machine, each holding its own copy of torch and data
MAX_BATCH = 4096  # images per batch (4096 x 3 x 512 x 512 float32 is already 12 GB)
MAX_CALIBRATION_IMAGES = 65536  # held in memory at once as float32
MAX_BENCHMARK_RUNS = 100_000  # timed or warm-up runs: beyond this only the wait grows
MAX_BOOTSTRAP_RESAMPLES = 20_000  # resamples x test images int64 indices (CIFAR-10: 1.6 GB)

# YAML files read strictly (params.yaml, presets, dvc.yaml; resnet_slim/params.py read_yaml), all
# a few KB here: each cap is checked before the document is built, so a typo or a hostile file is
# one line, not gigabytes. 11 KB of nested aliases (`&a [*b, *b, ...]`, 9 deep) would expand to
# ~400 million values in memory; 50,000 nested brackets were a RecursionError in PyYAML.
MAX_YAML_BYTES = 1 << 20  # 1 MiB: the file itself (ours: ~10 KB)
MAX_YAML_NODES = 100_000  # values (scalars, lists, mappings) once every alias is expanded
MAX_YAML_CHARS = 10_000_000  # characters of all scalars once every alias is expanded
MAX_YAML_DEPTH = 64  # nesting of lists / mappings, also once expanded (ours: 4)
# an integer's digits: Python refuses to convert more than 4,300 (a ValueError deep inside
# PyYAML), and every integer setting here is at most 10 digits (MAX_SEED)
MAX_YAML_INT_CHARS = 100

# prepare.max_file_mb may not exceed this: each decoding worker reads a whole image file into
# memory, so the workers together hold up to cores x the cap
MAX_IMAGE_FILE_MB = 1024.0

# the side of the square images a prepared dataset holds, px: what prepare.image_size allows
# (params.py), and what data.load_meta accepts in data/prepared/meta.json
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 512
