"""resnet-slim: a gated compression pipeline for ResNet image classifiers
(prune, QAT, distill, ONNX INT8).

Stage scripts in `stages/` are thin glue run as `python -m stages.<name>` from the workspace root,
so they always import this package from the workspace they run in (a `dvc exp run --temp` copy
included). Modules by concern:

- data: `prepare` (sources, given or random splits, streamed decoding, prepared splits), `pixels`
  (the image preprocessing and split file format), `data` (memory-mapped splits, batches),
  `validate` (Great Expectations suite)
- models and training: `models` (ResNet / MobileNet builders, checkpoint records), `engine` (the one
  training loop), `distributed` (torchrun + DDP)
- compression: `prune` (network slimming), `lowrank` (SVD), `distill` (KD), `qat` (fake-quant INT8),
  `onnx_int8` (int8 weight storage in QDQ ONNX), `quant` (onnxruntime PTQ), `export` (ONNX,
  parity, MAC count), `targets` (OpenVINO, LiteRT, ...)
- measurement: `bench` (latency, size, memory, top-1), `timing` (models timed side by side in
  shuffled rounds), `hardware` (CPU fingerprint, VNNI), `roofline` (MACs vs CPU peak), `stats` (CIs,
  paired drop, McNemar, speed-up ratios over rounds), `seeds` (seed repeats)
- decision and reporting: `gate` (the release gate), `metrics` (headline metrics for DVC),
  `report`, `report_sections`, `render`, `plots`, `experiments`, `presets`
- plumbing: `params` (typed params.yaml), `io` (atomic writes, safe checkpoint loading), `errors`,
  `limits` (caps and usable cores), `model_import` (bring your own model)
- serving: `serve` (web UI / JSON API for the gated release)
"""
