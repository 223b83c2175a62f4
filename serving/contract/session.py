"""The onnxruntime session options every ONNX session of the project uses (runtime, batch, export)."""

from __future__ import annotations

import onnxruntime as ort


def session_options(threads: int = 0, spinning: bool = False) -> ort.SessionOptions:
    """``threads`` intra-op threads (0: one per physical core, onnxruntime's default), one inter-op
    thread, sequential execution, all graph optimisations.

    The runtime uses one thread per session: batch-1 requests gain nothing from a thread pool (ORT's
    call overhead dominates; ``make bench-runtime``) and ``--workers`` scales across cores with
    processes instead. Spinning is off by default: idle onnxruntime threads would otherwise
    busy-wait and take the cores the event loop (runtime) or the reader and writer threads (batch)
    need.
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(0, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    flag = "1" if spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", flag)
    so.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return so
