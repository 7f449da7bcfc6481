"""How a lesion probability map is stored in ``<stem>_cancer_prob.png``: the encodings, both ways, and their text.

What lives here: :data:`PROB_ENCODINGS`, :func:`encode_probability` / :func:`decode_probability` and
:func:`encoding_text` (the record's ``cancer_prob_encoding``).
"""

from __future__ import annotations

import numpy as np

#: Probability PNG encodings: name -> (dtype, full-scale value). Value = round(probability x full scale).
PROB_ENCODINGS = {"uint8": (np.uint8, 255), "uint16": (np.uint16, 65535)}


def encode_probability(prob: np.ndarray, encoding: str = "uint8") -> np.ndarray:
    """Lesion probability ``(H, W)`` float in [0, 1] -> uint8 (round(p x 255)) or uint16 (round(p x 65535))."""
    dtype, full = PROB_ENCODINGS[encoding]
    return np.rint(np.clip(prob, 0.0, 1.0) * full).astype(dtype)


def decode_probability(encoded: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_probability` (from the array's dtype): ``(H, W)`` float32 in [0, 1]."""
    full = 65535.0 if encoded.dtype == np.uint16 else 255.0
    return encoded.astype(np.float32) / full


def encoding_text(encoding: str) -> str:
    """The record's ``cancer_prob_encoding``: how to turn a ``<stem>_cancer_prob.png`` value back into a probability."""
    full = PROB_ENCODINGS[encoding][1]
    return f"{encoding}: pixel value = round(probability x {full}); probability = value / {full}"
