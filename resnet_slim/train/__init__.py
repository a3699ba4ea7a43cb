"""Models and training: what every training stage runs.

`architectures` (ResNet / CIFAR ResNet / MobileNet networks), `models` (checkpoint records: build,
load, resize and factorize layers), `model_bounds` (size limits of a record, checked before
building), `engine` (the one training loop and its losses), `epoch_log` (its DVCLive and console
reporting), `distributed` (torchrun + DDP), `resume` (per-epoch checkpoints that a stopped stage
continues from), `model_import` (bring your own model), `teacher` (the train_teacher stage's work).
"""
