"""The method on one array: stage 1 -> FGT region of interest -> stage 2, and loading a cascade from its stage files.

What lives here: :mod:`~mammo.cascade.pipeline` (the :class:`Cascade` and its results), :mod:`~mammo.cascade.load`
(both stage files -> a :class:`~mammo.cascade.load.LoadedCascade`) and :mod:`~mammo.cascade.checks` (the user's
paths and stage files checked before any work). The pipeline's names are re-exported here.
"""

from mammo.cascade.pipeline import (ADAPTIVE_CLAHE_CONFIDENCE, Cascade, CascadeResult, TissueAndRoi, checkpoint_stage,
                                    predict_lesion, predict_lesion_batch, predict_tissue, predict_tissue_batch,
                                    stage_mismatch)

__all__ = ["ADAPTIVE_CLAHE_CONFIDENCE", "Cascade", "CascadeResult", "TissueAndRoi", "checkpoint_stage",
           "predict_lesion", "predict_lesion_batch", "predict_tissue", "predict_tissue_batch", "stage_mismatch"]
