"""resnet-slim: a gated compression pipeline for ResNet image classifiers
(prune, QAT, distill, ONNX INT8).

Stage scripts in `stages/` are thin glue run as `python -m stages.<name>` from the workspace root,
so they always import this package from the workspace they run in (a `dvc exp run --temp` copy
included). The package is laid out in the order data flows through the pipeline, one folder
per part:

- `data/`: prepare, sources, decode, pixels, loader, validate
- `train/`: models, architectures, model_bounds, engine, epoch_log, distributed, resume, teacher,
  model_import
- `compress/`: prune, channel_removal, depth, latency_model, latency_prune, lowrank, distill,
  student, qat, qat_export, quant, onnx_int8, export
- `measure/`: bench, bench_stage, timing, latency_units, latency_table, latency_check,
  roofline, targets, target_bench, evidence
- `gate/`: gate, checks, metrics, seeds, verdict
- `report/`: report, sections, baselines, methods, measured, cells, render, plots, snapshot,
  experiments
- at the top, used by every part: `params` (typed params.yaml), `registry` (the closed name
  lists params.yaml's choices come from), `io` (atomic writes), `checkpoints` (saving and safely
  loading model files), `errors`, `limits` (caps and usable cores), `stats` (CIs, paired drop,
  McNemar, speed-up ratios over rounds), `hardware` (CPU fingerprint, VNNI), `presets`; and
  `serve` with `serve_release` and `serve_app` (the web UI / JSON API for the gated release,
  which reads every part)

A module imports from its own folder, from earlier parts and from the top, never from a later part
(tests/test_dvc_pipeline.py checks there are no import circles).
"""
