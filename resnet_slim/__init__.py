"""resnet-slim: a gated compression pipeline for ResNet image classifiers (prune, QAT, distill, ONNX INT8).

Stage scripts in `stages/` are thin glue run as `python -m stages.<name>` from the workspace root, so
they always import this package from the workspace they run in (a `dvc exp run --temp` copy
included). Modules by concern:

- data: `data` (sources, splits, prepared splits, batches), `validate` (Great Expectations suite)
- models and training: `models` (ResNet / MobileNet builders, checkpoint records), `engine` (the one
  training loop), `distributed` (torchrun + DDP)
- compression: `prune` (network slimming), `lowrank` (SVD), `distill` (KD), `qat` (fake-quant INT8),
  `quant` (onnxruntime PTQ), `export` (ONNX + parity), `targets` (OpenVINO, LiteRT, ...)
- measurement: `bench` (latency, size, memory, top-1), `roofline` (MACs vs CPU peak), `stats` (CIs,
  paired drop, McNemar), `seeds` (seed repeats)
- decision and reporting: `gate` (the release gate), `metrics` (headline metrics for DVC),
  `report`, `report_sections`, `render`, `plots`, `experiments`, `presets`
- plumbing: `params` (typed params.yaml), `io` (atomic writes, safe checkpoint loading), `errors`
- serving: `serve` (web UI / JSON API for the gated release)
"""
