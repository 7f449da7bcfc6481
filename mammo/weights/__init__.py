"""A stage on disk -> a runner for any backend: ``checkpoints`` (the training checkpoint format), ``release``
(float16 safetensors model files, the shipped default model, the stage-2 lesion settings), ``onnx_export`` (a
checkpoint -> ``.onnx`` with its settings), ``runners`` (PyTorch or ONNX Runtime, the export cache), ``export``
(both stages to ONNX with a parity check)."""
