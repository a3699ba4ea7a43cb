"""Stage scripts: one per dvc.yaml stage, run as `python -m stages.<name>` from the workspace
root."""
