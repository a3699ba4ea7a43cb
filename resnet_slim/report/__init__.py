"""Reporting: what a reviewer reads.

`report` (the report stage's inputs and pages); its tables and paragraphs: `sections` (the
release: gate verdict, deployment checklist), `baselines` (every model against the reference and
its peers), `methods` (pruning, low-rank, distillation, QAT, training curves), `measured` (timing,
noise, hardware), `cells` (how a number prints); `render` (markdown to HTML), `plots`, `snapshot`
(freezing a run for review), `experiments` (comparing DVC experiments).
"""
