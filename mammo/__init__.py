"""The cascade mammogram segmentation suite: one folder per phase of the pipeline, imports pointing down.

``core`` (leaf helpers) < ``imaging`` (a file -> one array -> the network's image, and back) < ``nn`` (networks,
losses) < ``data`` | ``weights`` (tables and splits; a stage on disk -> a runner) < ``cascade`` (the method on one
array) < ``inference`` | ``training`` | ``evaluation`` | ``prepare`` < ``bench`` < ``cli`` (the command lines). The
layers are an import-linter contract in ``pyproject.toml``, checked by the test suite.
"""
