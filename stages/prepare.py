"""prepare: read the configured source, drop duplicates, split train/val/test, write data/prepared."""

import argparse
from pathlib import Path

from resnet_slim import data
from resnet_slim.errors import UserError, run_stage
from resnet_slim.params import load_params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/prepared")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    p = params.prepare

    if p.source == "digits":
        raw = data.load_digits(p.image_size)
    elif p.root is None:
        raise UserError(f"prepare.root: source '{p.source}' needs a root directory")
    elif p.source == "imagefolder":
        raw = data.load_imagefolder(Path(p.root), p.image_size, on_bad_image=p.on_bad_image)
    else:
        raw = data.load_cifar10(Path(p.root), p.image_size)
    conflicts = data.label_conflicts(raw)  # same bytes, different classes: the label is a guess
    raw, n_duplicates = data.drop_duplicates(raw)
    if p.max_images_per_class is not None:
        raw = data.subsample_per_class(raw, p.max_images_per_class, seed=params.base.seed)
    split = data.stratified_split(raw.labels, val_fraction=p.val_fraction,
                                  test_fraction=p.test_fraction, seed=params.base.seed)
    data.write_prepared(args.out, raw, split, extra_meta={
        "source": p.source, "root": p.root, "duplicates_dropped": n_duplicates,
        "duplicate_label_conflicts": conflicts}, normalize=p.normalize)
    counts = {s: int((split == s).sum()) for s in data.SPLITS}
    print(f"prepare: {len(raw.labels)} images, {len(raw.class_names)} classes, {counts}, "
          f"{n_duplicates} duplicates dropped, {len(raw.skipped)} bad files skipped -> {args.out}")
    if conflicts:
        print(f"prepare: warning: {len(conflicts)} image(s) filed under more than one class; the "
              f"first class was kept (see meta.json duplicate_label_conflicts): "
              + "; ".join(conflicts[:3]))


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
