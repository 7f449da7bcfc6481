"""Dataset sources of ``prepare_to_train.py``: each module turns one kind of download into samples.

- ``common.py``: what every source shares and the workspace writer consumes: ``Sample`` (one output and how to
  build it), ``Built``, ``SkipSample``, ``Report``, the cache version, file-name parsing and mask fitting.
- ``cbis_ddsm.py``: CBIS-DDSM (description CSVs + DICOM files).
- ``mini_ddsm.py``: Mini-DDSM (``DataWMask.xlsx`` and the Data-MoreThanTwoMasks table).
- ``folders.py``: the DDSM tissue-label folders (``fgt_seg`` / ``fgt_seg_labels``) and ``images/`` + ``masks/``
  pair folders (CDD-CESM and others).
- ``archives.py``: downloaded zips (recognised by name, extracted once) and the tissue-set download.
- ``synthetic_source.py``: the ``--synthetic`` samples (drawn by the top-level ``synthetic.py``).

Writing the samples into a workspace is ``workspace.py``'s job.
"""
