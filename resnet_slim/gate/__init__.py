"""The decision: which model ships, and the evidence behind it.

`gate` (the release gate's verdict), `checks` (the checks it runs), `metrics` (the headline
metrics file for DVC, written by the gate), `seeds` (seed repeats), `verdict` (reading gate.json
strictly, for serving).
"""
