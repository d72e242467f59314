"""The plan's decisions: E-P4.4 selection (weighted score, proceed thresholds, decision matrix),
E-P4.7 recommendation (must-pass, should-pass, recommendation framework) and the section 5.3
success level, applied to measured runs.

- `criteria`: a plan criterion judged on a measurement and its 95% interval.
- `measure`: a run's measurements from its metrics files (absent or invalid means not measured).
- `score`: the E-P4.4 weighted score and how each component is normalised.
- `tables`: the decision tables, each a pure function of the candidates' measurements.
- `decide`: everything above for a set of runs, as one JSON-ready dict.

The tables' thresholds and wording are data, in `vlmprobe/report/plan.yaml`.
"""
