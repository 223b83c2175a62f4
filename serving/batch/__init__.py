"""Offline (batch) scoring: ``python -m serving.batch --model_dir DIR --input FILE --output FILE``.

The scoring itself lives in ``pipelines.core.scoring`` so the KFP batch component embeds the very
same code; this package is the command-line shell around it (arguments, progress, signals, errors).
"""
