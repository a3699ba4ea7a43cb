"""Shared fixtures: tiny prepared datasets and tiny models, so every test runs in seconds."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from resnet_slim import data
from resnet_slim.models import build_model, make_arch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """Digits at 8 px, 40 per class: a real prepared dataset directory written by the library."""
    out = tmp_path_factory.mktemp("data") / "prepared"
    raw = data.subsample_per_class(data.load_digits(8), 40, seed=0)
    split = data.stratified_split(raw.labels, val_fraction=0.2, test_fraction=0.2, seed=0)
    data.write_prepared(out, raw, split, extra_meta={"source": "digits"})
    return out


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(make_arch(name="resnet18", num_classes=10, width=8, small_input=True)).eval()


def write_image_tree(root: Path, classes: dict[str, int], size: int = 12, seed: int = 0) -> Path:
    """root/<class>/<i>.png with distinct random images; returns root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def write_params(path: Path, **overrides) -> Path:
    """params.yaml = the repo's defaults with `section={key: value}` overrides (tiny settings)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(params))
    return path
