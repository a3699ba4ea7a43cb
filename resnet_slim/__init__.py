"""resnet-slim: a gated compression pipeline for ResNet image classifiers
(prune, QAT, distill, ONNX INT8).

Stage scripts in `stages/` are thin glue run as `python -m stages.<name>` from the workspace root,
so they always import this package from the workspace they run in (a `dvc exp run --temp` copy
included). The package is laid out in the order data flows through the pipeline, one folder
per part:

- `data/`: prepare, pixels, loader, validate
- `train/`: models, engine, distributed, resume, model_import
- `compress/`: prune, lowrank, distill, qat, quant, onnx_int8, export
- `measure/`: bench, timing, roofline, targets, evidence
- `gate/`: gate, metrics, seeds, verdict
- `report/`: report, sections, render, plots, snapshot, experiments
- at the top, used by every part: `params` (typed params.yaml), `io` (atomic writes, safe
  checkpoint loading), `errors`, `limits` (caps and usable cores), `stats` (CIs, paired drop,
  McNemar, speed-up ratios over rounds), `hardware` (CPU fingerprint, VNNI), `presets`; and
  `serve` (the web UI / JSON API for the gated release, which reads every part)

A module imports from its own folder, from earlier parts and from the top, never from a later part
(tests/test_dvc_pipeline.py checks there are no import circles).
"""
