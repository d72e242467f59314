"""`vlmprobe compare`: every run of the pipeline (workspace, commits, DVC experiments) decided on
together, written as the plan's deliverables (section 11.1) with comparison figures.

- `gather`: runs from `dvc exp show --json`.
- `documents`: phase1-summary.md, alignment-study.md, reconstruction-study.md,
  final-recommendation.md.
- `figures`: the PNG figures the documents link.
"""
