"""prepare: read the dataset at prepare.root, drop duplicates, keep or make the train/val/test
split, write data/prepared (memory-mappable .npy splits, manifest.csv, meta.json)."""

import argparse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from resnet_slim.data.prepare import prepare_dataset
    from resnet_slim.params import load_params

    params = load_params(args.params)
    summary = prepare_dataset(params.prepare, seed=params.base.seed, out_dir=args.out)
    print(
        f"prepare: {summary['images']} images, {summary['classes']} classes, {summary['split']} "
        f"split {summary['counts']}, {summary['duplicates']} duplicates dropped, "
        f"{summary['skipped']} bad files skipped -> {args.out}"
    )
    if conflicts := summary["conflicts"]:
        print(
            f"prepare: warning: {len(conflicts)} image(s) filed under more than one class; the "
            f"first class was kept (see meta.json duplicate_label_conflicts): "
            + "; ".join(conflicts[:3])
        )


if __name__ == "__main__":
    from resnet_slim.errors import run_stage

    raise SystemExit(run_stage(main))
