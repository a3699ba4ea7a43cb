"""Compression: making the teacher smaller and INT8.

`prune` (network slimming, its stage's work), `channel_removal` (physical channel removal), `depth`
(whole residual blocks: their cost and removal), `latency_model` (the blocks a model is made of and
its latency predicted from a measured table), `latency_prune` (removal and narrowing planned to a
latency budget), `lowrank` (SVD factorization, its stage's work), `distill` (KD: teacher-output
cache, loss, projectors), `student` (the distill_student stage's work), `qat` (fake-quant INT8
training), `qat_export` (its QDQ ONNX export and check), `quant` (onnxruntime PTQ baselines),
`onnx_int8` (int8 weight storage in QDQ ONNX), `export` (ONNX export with its parity check,
onnxruntime sessions, MAC counts).
"""
