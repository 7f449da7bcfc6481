"""The ``--synthetic N`` source: samples drawn by :mod:`mammo.data.synthetic` (smoke tests, never real data)."""

from __future__ import annotations

from mammo.data import synthetic
from mammo.prepare.sources.common import Built, Sample


def synthetic_samples(n: int, seed: int) -> list[Sample]:
    """``n`` tissue samples and ``n`` lesion samples drawn by :mod:`mammo.data.synthetic` (source "synthetic").

    The tissue and lesion samples of case ``i`` share the picture; a lesion-free case gets no mask file.
    """
    samples: list[Sample] = []
    for i in range(n):
        case = synthetic.make_case(i, seed)  # a few milliseconds; keeps names and metadata in one place
        params = f"synthetic v{synthetic.GENERATOR_VERSION} seed={seed} index={i} size={case.image.shape}"
        meta = {"patient_id": case.patient_id, "laterality": case.laterality, "view": case.view, "split": "",
                "original_name": f"synthetic:seed={seed}:index={i}"}
        samples.append(Sample("tissue", "synthetic", case.name, case.name, dict(meta), [],
                              lambda c=case: Built(image=c.image, label=c.tissue_label), params=params))
        lesion_meta = dict(meta, pathology="SYNTHETIC" if case.n_lesions else "NORMAL",
                           abnormality="synthetic blob" if case.n_lesions else "", acquisition="", augmentation="")
        samples.append(Sample("lesion", "synthetic", case.name, case.name, lesion_meta, [],
                              lambda c=case: Built(image=c.image, label=c.lesion_mask if c.n_lesions else None,
                                                   n_masks=c.n_lesions),
                              params=params))
    return samples
