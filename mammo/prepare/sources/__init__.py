"""Dataset sources of the preparer (``mammo/cli/prepare.py``; face ``prepare_to_train.py``): each module turns one
kind of download into samples.

- ``common.py``: what every source shares and the workspace writer consumes: ``Sample`` (one output and how to
  build it), ``Built``, ``SkipSample``, ``Report``, the cache version, file-name parsing and mask fitting.
- ``cbis_ddsm.py``: CBIS-DDSM (description CSVs + DICOM files).
- ``mini_ddsm.py``: Mini-DDSM (``DataWMask.xlsx`` and the Data-MoreThanTwoMasks table).
- ``csaw_s.py``: CSAW-S (digital mammograms with partial tissue labels, for stage 1).
- ``folders.py``: the DDSM tissue-label folders (``fgt_seg`` / ``fgt_seg_labels``) and ``images/`` + ``masks/``
  pair folders (CDD-CESM and others).
- ``archives.py``: downloaded zips (recognised by name, extracted once) and the tissue-set download.
- ``synthetic_source.py``: the ``--synthetic`` samples (drawn by ``mammo/data/synthetic.py``).

Writing the samples into a workspace is ``mammo/prepare/workspace.py``'s job. Tables are read with
``mammo.data.tables`` and images with ``mammo.imaging``.
"""
