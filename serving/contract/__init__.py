"""What every part of mlrollout agrees on; imports nothing else of the project.

* :mod:`~serving.contract.modelcard`: the model package (layout, model card, sha256, find/verify/write);
* :mod:`~serving.contract.signals`: the serving signals (the score, ``mlrollout_*`` metric names,
  label keys, buckets) that the runtime exports and the rollout reads;
* :mod:`~serving.contract.errors`: :class:`~serving.contract.errors.MlrolloutError`, the base of the
  project's own errors;
* :mod:`~serving.contract.session`: the onnxruntime session options every ONNX session uses.

Training, the runtime, batch scoring and the rollout stand on it, never the reverse.
"""
