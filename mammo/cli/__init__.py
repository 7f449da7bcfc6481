"""The command lines: one module per script (``prepare``, ``train``, ``infer``, ``evaluate``, ``benchmark``,
``onnx_backend``; each ``get_args_parser()`` -> ``main(args)``) and ``common`` (the shared runtime flags, argument
types, one-line usage errors). The root scripts and the ``mammo-*`` entry points call these ``main`` functions."""
