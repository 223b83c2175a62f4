"""The floor: what one Python worker can do with FastAPI + uvicorn and no model at all.

One route shaped like the V2 infer route; it parses the JSON body and returns a constant JSON.
Single uvicorn worker, access log off, uvicorn's defaults otherwise (uvloop + httptools).

    python -m serving.bench.floor --port 8080
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI, Request

CONSTANT = {
    "model_name": "floor",
    "outputs": [{"name": "probabilities", "shape": [1, 2], "datatype": "FP32", "data": [0.5, 0.5]}],
}

app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@app.get("/v2/health/ready")
async def ready() -> dict:
    return {}


@app.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request) -> dict:
    await request.json()  # parse it: a server has to
    return CONSTANT


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    uvicorn.run(app, host=args.host, port=args.port, workers=1, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
