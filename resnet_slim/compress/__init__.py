"""Compression: making the teacher smaller and INT8.

`prune` (network slimming, physical channel removal), `lowrank` (SVD factorization),
`distill` (KD into a student), `qat` (fake-quant INT8 training and its QDQ export),
`quant` (onnxruntime PTQ baselines), `onnx_int8` (int8 weight storage in QDQ ONNX), `export`
(ONNX export with its parity check, onnxruntime sessions, MAC counts).
"""
