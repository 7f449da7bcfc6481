"""Preparing a training workspace from public mammography datasets (the command line: :mod:`mammo.cli.prepare`).

What lives here: :mod:`mammo.prepare.sources` (one module per kind of download, each turning its files into
samples: CBIS-DDSM, Mini-DDSM, CSAW-S, tissue-label and ``images/`` + ``masks/`` folders, zips, the synthetic set)
and :mod:`mammo.prepare.workspace` (writing the samples' images and masks, the CSV tables with their patient-level
splits, the report and the archive). Nothing here imports torch: the preparer reads files and tables only.
"""
