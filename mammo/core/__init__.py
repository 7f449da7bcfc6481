"""Leaf helpers that import nothing of the suite: ``fileio`` (atomic writes, hashes, strict JSON), ``labels`` (class
indices and names), ``metrics`` (Dice, IoU, density, lesion detection), ``distributed`` (torchrun / DDP set-up)."""
