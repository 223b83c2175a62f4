"""KServe's default request path: the plain custom model a user writes from the KServe docs.

A ``kserve.Model`` whose synchronous ``predict`` reads the V2 input, runs onnxruntime and returns
an ``InferResponse``; started by ``kserve.ModelServer`` with its default flags (access log,
latency logging, gRPC server on). The only changes to KServe's behaviour: both listeners bind
127.0.0.1 instead of 0.0.0.0 / [::] (KServe 0.21 hard-codes those), so the benchmark stays on
loopback.

    python -m serving.bench.kserve_plain --model_onnx PATH --model_name NAME --http_port N --grpc_port M
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
import uvicorn


def _force_loopback() -> None:
    """Make KServe's REST (uvicorn) and gRPC listeners bind 127.0.0.1 only."""
    import grpc.aio
    import kserve.protocol.grpc.server as grpc_server
    import kserve.protocol.rest.server as rest_server

    class LoopbackConfig(uvicorn.Config):
        def __init__(self, *args, **kwargs):
            kwargs["host"] = "127.0.0.1"
            super().__init__(*args, **kwargs)

    rest_server.uvicorn.Config = LoopbackConfig  # type: ignore[misc]

    real_server = grpc.aio.server

    def loopback_server(*args, **kwargs):
        srv = real_server(*args, **kwargs)
        add = srv.add_insecure_port
        srv.add_insecure_port = lambda addr: add(addr.replace("[::]", "127.0.0.1"))
        return srv

    grpc_server.aio.server = loopback_server  # type: ignore[attr-defined]


def main() -> None:
    import kserve
    from kserve import InferOutput, InferRequest, InferResponse

    class OnnxModel(kserve.Model):
        def __init__(self, name: str, path: str):
            super().__init__(name)
            self.path = path
            self.session: ort.InferenceSession | None = None

        def load(self) -> bool:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            self.session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
            self.ready = True
            return self.ready

        def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
            x = payload.inputs[0].as_numpy().astype(np.float32)
            label, proba = self.session.run(None, {self.input_name: x})
            outputs = []
            for name, arr in (("label", label), ("probabilities", proba)):
                dtype = "INT64" if arr.dtype == np.int64 else "FP32"
                out = InferOutput(name=name, shape=list(arr.shape), datatype=dtype)
                out.set_data_from_numpy(arr, binary_data=False)
                outputs.append(out)
            return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs)

    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--model_onnx", required=True)
    args, _ = parser.parse_known_args()
    _force_loopback()
    model = OnnxModel(args.model_name, args.model_onnx)
    model.load()
    kserve.ModelServer().start([model])


if __name__ == "__main__":
    main()
