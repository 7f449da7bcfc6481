"""The cascade against ground truth: ``cases`` (ground-truth readers of every layout), ``predictors`` (a folder of
outputs or the cascade run here), ``scores`` (per-image rows, summaries, conventions), ``plots`` (the figures)."""
