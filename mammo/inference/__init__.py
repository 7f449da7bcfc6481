"""Inference on files: a loaded cascade run on mammograms, and everything written or shown for them.

What lives here: :mod:`~mammo.inference.listing` (a run's inputs, their torchrun shares),
:mod:`~mammo.inference.predict` (running the cascade on one file or a folder, the summary, the viewer wiring),
:mod:`~mammo.inference.record` (the per-image measurements and the JSON record), :mod:`~mammo.inference.outputs` (the
PNG / JSON / CSV files and the figure), :mod:`~mammo.inference.probability` (the probability PNG's encodings),
:mod:`~mammo.inference.dicom_seg` (the DICOM Segmentation of a DICOM input) and :mod:`~mammo.inference.viewer` (the
interactive OpenCV viewer). The command line is ``cascade_inference.py`` (:mod:`mammo.cli.infer`).
"""
