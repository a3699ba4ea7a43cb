"""cache_teacher: run the teacher once over the training split; save its logits and features,
keyed by the teacher checkpoint's sha256, for every distillation run and sweep to reuse."""

import argparse

from resnet_slim.data import load_meta, normalized_split
from resnet_slim.distill import save_teacher_cache, teacher_outputs
from resnet_slim.io import sha256_file
from resnet_slim.engine import seed_everything
from resnet_slim.errors import run_stage
from resnet_slim.models import load_model
from resnet_slim.params import load_params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", default="models/teacher.pt")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--out", default="models/teacher_outputs.pt")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    seed_everything(params.base.seed, params.base.threads)

    teacher, checkpoint = load_model(args.teacher,
                                     num_classes=len(load_meta(args.data)["class_names"]))
    images, _ = normalized_split(args.data, "train")
    outputs = teacher_outputs(teacher, images, stages=params.distill.stages_in_use)
    save_teacher_cache(args.out, outputs, teacher_sha256=sha256_file(args.teacher), n_images=len(images))
    print(f"cache_teacher: {len(images)} images, {sorted(outputs)} -> {args.out}")


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
