"""``OnnxModel``: a ``kserve.Model`` over onnxruntime serving one package written by ``package_model``.

``load()`` checks the card's sha256, opens the ONNX session with deliberate thread settings, checks
the graph against the card, runs one warm-up inference and only then marks the model ready.
KServe's own request path (gRPC) calls :meth:`predict`; the REST fast path in ``serving.runtime.asgi``
calls :meth:`infer` directly. Both share ``serving.runtime.core``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from kserve import Model
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from serving.contract import modelcard, signals
from serving.contract.session import session_options
from serving.runtime import core, kserve_compat
from serving.runtime.metrics import ModelMetrics

log = logging.getLogger("kserve.mlrollout")

FAULT_ENV_PREFIX = "MLROLLOUT_FAULT_"
FAULT_ERROR_RATE_ENV = f"{FAULT_ENV_PREFIX}ERROR_RATE"
FAULT_LATENCY_ENV = f"{FAULT_ENV_PREFIX}LATENCY_MS"


class InjectedFault(RuntimeError):
    """Raised by the opt-in fault knob (test/demo only): answered as 500 / gRPC INTERNAL."""


@dataclass(frozen=True)
class Faults:
    """Test/demo-only fault injection: read from the environment only with ``--enable_fault_injection``."""

    error_rate: float = 0.0
    latency_ms: float = 0.0

    @classmethod
    def from_env(cls, env: dict | None = None) -> Faults:
        env = os.environ if env is None else env
        values = {}
        for key, attr, hi in (
            (FAULT_ERROR_RATE_ENV, "error_rate", 1.0),
            (FAULT_LATENCY_ENV, "latency_ms", 60000.0),
        ):
            raw = env.get(key, "").strip()
            if not raw:
                continue
            try:
                v = float(raw)
            except ValueError:
                raise ValueError(f"{key}={raw!r} is not a number") from None
            if not 0.0 <= v <= hi:
                raise ValueError(f"{key}={raw!r} is out of range [0, {hi:g}]")
            values[attr] = v
        return cls(**values)

    @property
    def active(self) -> bool:
        return self.error_rate > 0 or self.latency_ms > 0

    def describe(self) -> str:
        return f"error_rate={self.error_rate:g}; latency_ms={self.latency_ms:g}"


class OnnxModel(Model):
    def __init__(
        self,
        model_dir: str | os.PathLike,
        name: str | None = None,
        max_batch_size: int = 1024,
        ort_threads: int = 1,
        inline_max_rows: int = 64,
        faults: Faults | None = None,
    ):
        self.package_dir = modelcard.find_package(model_dir)
        card = modelcard.load_card(self.package_dir)
        super().__init__(name or card["name"])
        self.max_batch_size = max_batch_size
        self.ort_threads = ort_threads
        self.inline_max_rows = inline_max_rows
        self.faults = faults or Faults()
        self.card: dict = card
        self.spec: core.ModelSpec | None = None
        self.session: ort.InferenceSession | None = None
        self.metrics: ModelMetrics | None = None
        self._executor: ThreadPoolExecutor | None = None

    # --- loading -----------------------------------------------------------------------------------------

    def load(self) -> bool:
        self.card = modelcard.verify_package(self.package_dir)  # raises ModelPackageError on sha256 mismatch
        self.spec = core.ModelSpec.from_card(self.card, self.name)
        self._open_session()
        self._check_graph()
        warm = np.zeros((1, self.spec.n_features), dtype=np.float32)
        t0 = time.perf_counter()
        fast = self.run(warm)
        warm_ms = (time.perf_counter() - t0) * 1000
        public = self.session.run(self._output_order, {self.spec.input_name: warm})
        if not all(np.array_equal(a, b) for a, b in zip(fast, public, strict=True)):
            raise RuntimeError("onnxruntime's direct session call disagrees with InferenceSession.run")
        if self.spec.classes and fast[1].shape[-1] != len(self.spec.classes):
            raise modelcard.ModelPackageError(
                f"{self.package_dir}: model card lists {len(self.spec.classes)} classes, "
                f"the graph scores {fast[1].shape[-1]}"
            )
        log.info(
            "model %s %s loaded from %s (sha256 %s…), warm-up inference %.2f ms",
            self.name,
            self.spec.version,
            self.package_dir,
            self.card["sha256"][:12],
            warm_ms,
        )
        self.metrics = ModelMetrics(self.name, self.spec.version, self.spec.classes)
        self.ready = True
        return True

    def _open_session(self) -> None:
        path = modelcard.onnx_path(self.package_dir)
        # one intra-op thread by default, no spinning (serving/README.md, "Speed: what was chosen and why")
        so = session_options(self.ort_threads)
        so.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        self._output_order = ["label", "probabilities"]
        # The public InferenceSession.run re-validates input names, OrtValue ownership and graph-capture
        # options on every call (~15 % of a batch-1 call); the runtime has validated the feed itself, so
        # it calls the bound C++ session directly when this onnxruntime has one. load() checks both agree.
        inner_run = kserve_compat.direct_session_run(self.session)
        if inner_run is not None:
            self._run = lambda names, feed: inner_run(names, feed, None)
        else:  # pragma: no cover - other onnxruntime builds
            self._run = self.session.run

    def _check_graph(self) -> None:
        """The card is the server's contract with its clients (metadata, datatypes, names in answers):
        refuse to start when it disagrees with the graph, rather than serve errors or lies on every call."""
        spec = self.spec
        problems = check_card_fields(self.card, self.name)
        inputs = self.session.get_inputs()
        graph_out = {o.name: o for o in self.session.get_outputs()}
        if len(inputs) != 1 or inputs[0].name != spec.input_name:
            problems.append(f"graph inputs {[i.name for i in inputs]} != card input {spec.input_name!r}")
        else:
            g = inputs[0]
            if isinstance(g.shape[-1], int) and g.shape[-1] != spec.n_features:
                problems.append(f"graph takes {g.shape[-1]} features, card says {spec.n_features}")
            gtype = modelcard.ONNX_TO_V2.get(g.type, g.type)
            if spec.input_datatype != gtype or gtype not in core.ACCEPTED_INPUT_DATATYPES:
                problems.append(f"card input datatype {spec.input_datatype!r} but the graph takes {gtype}")
        want = {"label": "INT64", "probabilities": "FP32"}
        card_out = {o["name"]: o for o in spec.outputs}
        if set(card_out) != set(want):
            problems.append(f"card outputs {sorted(card_out)} != {sorted(want)}")
        for name, datatype in want.items():
            if name not in graph_out:
                problems.append(
                    f"graph has no output {name!r} (outputs {sorted(graph_out)}; ZipMap must be off)"
                )
                continue
            gtype = modelcard.ONNX_TO_V2.get(graph_out[name].type, graph_out[name].type)
            if gtype != datatype:
                problems.append(f"graph output {name!r} is {gtype}, expected {datatype}")
            if name in card_out and card_out[name].get("datatype") != gtype:
                problems.append(
                    f"card output {name!r} datatype {card_out[name].get('datatype')!r} != graph {gtype}"
                )
        if "probabilities" in graph_out and spec.classes:
            n = graph_out["probabilities"].shape[-1]
            if isinstance(n, int) and n != len(spec.classes):
                problems.append(f"card lists {len(spec.classes)} classes, the graph scores {n}")
        if problems:
            raise modelcard.ModelPackageError(
                f"{self.package_dir}: model card does not match its ONNX graph: " + "; ".join(problems)
            )

    # multi-worker REST (--workers > 1) pickles the model into spawned processes: reopen the session there
    def __getstate__(self):
        state = self.__dict__.copy()
        for k in ("session", "_run", "_executor", "metrics"):
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._executor = None
        if self.ready:
            self._open_session()
            self.metrics = ModelMetrics(self.name, self.spec.version, self.spec.classes)

    # --- inference ---------------------------------------------------------------------------------------

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels, proba = self._run(self._output_order, {self.spec.input_name: x})
        return labels, proba

    async def infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the checked matrix. Small batches run inline (an ORT call is ~25 µs, cheaper than a thread
        hand-off); bigger ones in a thread so the event loop keeps serving (ORT releases the GIL)."""
        if self.faults.active:
            await self._apply_faults()
        if x.shape[0] <= self.inline_max_rows:
            labels, proba = self._run(self._output_order, {self.spec.input_name: x})
        else:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=max(2, os.cpu_count() or 1), thread_name_prefix="ort"
                )
            labels, proba = await asyncio.get_running_loop().run_in_executor(self._executor, self.run, x)
        self.metrics.predictions(signals.score(proba), labels)
        return labels, proba

    async def _apply_faults(self) -> None:
        if self.faults.latency_ms:
            await asyncio.sleep(self.faults.latency_ms / 1000)
        if self.faults.error_rate and random.random() < self.faults.error_rate:
            raise InjectedFault(
                f"injected fault ({FAULT_ERROR_RATE_ENV}={self.faults.error_rate:g}; test/demo only)"
            )

    # --- KServe's path -----------------------------------------------------------------------------------

    def validate(self, payload):
        return payload  # everything is checked once, in predict() through serving.runtime.core

    async def predict(self, payload, headers=None):
        try:
            if isinstance(payload, InferRequest):
                return await self._predict_v2(payload)
            x, want = core.parse_v1(payload, self.spec, self.max_batch_size)
        except core.InputError as e:
            raise InvalidInput(e.message) from None
        labels, proba = await self.infer(x)
        return core.v1_response(labels, proba, want, self.spec.class_names)

    async def _predict_v2(self, request: InferRequest) -> InferResponse:
        body, raw = _infer_request_to_dict(request)
        req = core.parse_v2(body, self.spec, self.max_batch_size, raw=raw)
        labels, proba = await self.infer(req.x)
        arrays = core.output_arrays(labels, proba)
        dtypes = {o["name"]: o["datatype"] for o in self.spec.outputs}
        outputs = []
        for name, _binary in req.outputs:
            out = InferOutput(name=name, shape=list(arrays[name].shape), datatype=dtypes[name])
            out.set_data_from_numpy(arrays[name], binary_data=False)
            outputs.append(out)
        return InferResponse(
            response_id=req.id or str(uuid.uuid4()),  # KServe's InferenceResponse requires an id
            model_name=self.name,
            model_version=self.spec.version,
            infer_outputs=outputs,
            use_binary_outputs=request.use_binary_outputs,
            requested_outputs=request.request_outputs,
        )

    def get_input_types(self) -> list[dict]:
        s = self.spec
        return [{"name": s.input_name, "datatype": s.input_datatype, "shape": [-1, s.n_features]}]

    def get_output_types(self) -> list[dict]:
        return [dict(o) for o in self.spec.outputs]

    def stop(self):
        if self._executor is not None:
            self._executor.shutdown(wait=False)


def _infer_request_to_dict(request: InferRequest) -> tuple[dict, bytes | None]:
    """KServe's InferRequest (from gRPC or stock REST) -> the plain V2 dict ``core.parse_v2`` checks."""
    inputs, raw = [], None
    for inp in request.inputs:
        entry = {"name": inp.name, "datatype": inp.datatype, "shape": list(inp.shape or [])}
        inp_raw = kserve_compat.raw_input_bytes(inp)
        if inp_raw is not None:  # gRPC raw_input_contents
            raw = inp_raw
            entry["parameters"] = {"binary_data_size": len(raw)}
        else:
            data = inp.data
            entry["data"] = data.tolist() if isinstance(data, np.ndarray) else list(data or [])
        inputs.append(entry)
    body: dict = {"inputs": inputs, "id": request.id}
    if request.request_outputs:
        body["outputs"] = [{"name": o.name} for o in request.request_outputs]
    return body, raw


def check_card_fields(card: dict, served_name: str) -> list[str]:
    """Card fields that would reach HTTP headers and Kubernetes names: formats checked, not trusted."""
    problems = []
    for what, fn, value in (
        ("name", modelcard.check_name, card.get("name")),
        ("served name", modelcard.check_name, served_name),
        ("version", modelcard.check_version, card.get("version")),
    ):
        if not isinstance(value, str):
            problems.append(f"{what} must be a string, got {type(value).__name__}")
            continue
        try:
            fn(value)
        except modelcard.ModelPackageError as e:
            problems.append(str(e))
    classes = card.get("classes")
    if classes is not None and (not isinstance(classes, list) or len(set(map(str, classes))) != len(classes)):
        problems.append("classes must be a list of distinct labels")
    return problems
