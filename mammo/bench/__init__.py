"""Measuring the cascade's speed and memory on this machine (the command line: :mod:`mammo.cli.benchmark`).

What lives here: :mod:`mammo.bench.speed` (timers, peak memory, FLOPs, the networks, the whole cascade in a child
process, the training step, the targets and the printed table) and :mod:`mammo.bench.throughput` (whole-process
folder runs of ``cascade_inference.py`` against a plain single-network tool, and one process's peak RSS).
"""
