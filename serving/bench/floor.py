"""The floor: what one Python worker can do with FastAPI + uvicorn and no model at all.

One route shaped like the V2 infer route; it parses the JSON body and returns a constant JSON.
Single uvicorn worker, access log off, uvicorn's defaults otherwise (uvloop + httptools).

``--asgi`` serves a bare ASGI callable instead (no FastAPI/Starlette: read the body, ``orjson``
parse, constant bytes back): the lower floor of a Python server on uvicorn, for reference.

    python -m serving.bench.floor --port 8080 [--asgi]
"""

from __future__ import annotations

import argparse

import orjson
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


CONSTANT_BYTES = orjson.dumps(CONSTANT)
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(CONSTANT_BYTES)).encode())]


async def bare_app(scope, receive, send) -> None:
    """Bare ASGI: any POST → parse body → constant; any GET → {}."""
    if scope["type"] != "http":
        return
    body, more = b"", True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    out = b"{}"
    if scope["method"] == "POST":
        orjson.loads(body)
        out = CONSTANT_BYTES
    headers = _HEADERS if out is CONSTANT_BYTES else [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": out})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--asgi", action="store_true", help="bare ASGI app instead of FastAPI")
    args = ap.parse_args(argv)
    uvicorn.run(
        bare_app if args.asgi else app,
        host=args.host,
        port=args.port,
        workers=1,
        access_log=False,
        log_level="warning",
        lifespan="off" if args.asgi else "auto",
    )


if __name__ == "__main__":
    main()
