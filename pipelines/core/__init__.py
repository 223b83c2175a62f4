"""Plain-function core shared by the KFP components, the serving runtime and batch scoring.

Nothing in here imports kfp: every function takes and returns plain Python/numpy values, so it
is tested directly and embedded into the KFP components (``embedded_artifact_path``).
"""
