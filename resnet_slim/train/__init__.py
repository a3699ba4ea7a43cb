"""Models and training: what every training stage runs.

`models` (ResNet / MobileNet builders, checkpoint records, factorized layers), `engine`
(the one training loop and its losses), `distributed` (torchrun + DDP), `resume`
(per-epoch checkpoints that a stopped stage continues from), `model_import` (bring your
own model).
"""
