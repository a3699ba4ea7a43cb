"""Reporting: what a reviewer reads.

`report` (the report stage's inputs and pages), `sections` (its tables and paragraphs),
`render` (markdown to HTML), `plots`, `snapshot` (freezing a run for review), `experiments`
(comparing DVC experiments).
"""
