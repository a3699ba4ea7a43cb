"""Measurement: what the exported files do on the target.

`bench` (latency, size, memory, top-1 of each file), `timing` (models timed side by side in shuffled
rounds), `latency_table` (the measured price of each block a pruned model can be made of),
`latency_units` (those blocks as small graphs, exported and quantized), `latency_check` (its
predictions against the benchmark), `roofline` (MACs vs the CPU's peak), `targets` (OpenVINO,
LiteRT, ... builds and their peers), `evidence` (the hashes that tie a measurement to its files and
split).
"""
