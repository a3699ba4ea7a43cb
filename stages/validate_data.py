"""validate_data: run the Great Expectations suite on the prepared manifest; fail on any
violation."""

import argparse

from resnet_slim.data.loader import load_manifest, load_meta
from resnet_slim.data.validate import validate_manifest
from resnet_slim.errors import UserError, run_stage
from resnet_slim.io import write_json
from resnet_slim.params import load_params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--report", default="reports/data_validation.json")
    args = parser.parse_args(argv)
    p = load_params(args.params).validate_data

    meta = load_meta(args.data)
    report = validate_manifest(
        load_manifest(args.data),
        meta["class_names"],
        min_class_share=p.min_class_share,
        max_class_share=p.max_class_share,
    )
    report["skipped_images"] = meta.get("skipped_images", [])
    report["duplicate_label_conflicts"] = meta.get("duplicate_label_conflicts", [])
    write_json(args.report, report)
    if not report["success"]:
        raise UserError(
            f"data validation failed ({len(report['failed'])} checks, see "
            f"{args.report}): " + " || ".join(report["failed"])
        )
    print(
        f"validate_data: {len(report['checks'])} expectations passed on {report['n_images']} images"
    )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
