"""Offline (batch) scoring: ``python -m serving.batch --model_dir DIR --input FILE --output FILE``.

``engine`` (``score_file``: the read -> score -> write stages), ``source`` (CSV/Parquet input),
``sink`` (the atomic output writers), ``report`` (the run summary), ``model`` (the verified package
and its onnxruntime session), ``errors``, ``shard`` (splitting a table into shards) and
``sharded`` (scoring them and committing their parts: the sharded KFP pipeline); ``cli`` is the
command-line shell around them (arguments, progress, signals, errors). The KFP batch components
embed this very code (``pipelines/components/batch.py``).

Nothing is imported here: ``python -m serving.batch`` handles SIGINT before the heavy imports.
"""
