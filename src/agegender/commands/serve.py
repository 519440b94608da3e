"""HTTP service and browser page: ``agegender serve``.

:func:`create_app` builds a FastAPI app around one :class:`~agegender.predict.Predictor`, loaded
once at start-up and shared by every request (the same object the CLI and the Python API use):

- ``POST /api/predict``: multipart field ``image`` (JPEG, PNG or WebP), optional form field
  ``aligned=true``; answers ``{"faces": [...], "width": W, "height": H, "ms": float}`` with the
  same face objects as ``agegender predict --output``.
- ``POST /api/predict/batch``: up to ``max_batch`` ``images`` fields; one result per image, and a
  bad image (an oversized one included) gets its ``error`` and ``status`` without failing the
  others. Only a request over ``max_batch`` files' worth of bytes in total is refused whole.
- ``POST /api/track`` (a webcam's frames, tracked per client session) and ``POST /api/video``
  (an uploaded clip, answered with its persons): see :mod:`agegender.commands.serve_video`.
- ``GET /health``, ``GET /docs`` (OpenAPI) and ``GET /``: a single self-contained page (no build
  step, no CDN) to pick, drop or photograph an image and see the faces labelled, follow the
  faces of the webcam live, or send a clip.

Decoding, detection and the network run in a small thread pool so the event loop stays free;
uploads that queue up while the network is busy go through it together as one batch, and a
bounded queue answers 503 at once when full instead of piling requests up. Bad input
gets a JSON ``{"detail": "..."}`` with its status and never a traceback: 413 over the upload limit,
415 not an accepted image format, 422 truncated/corrupt data, too many pixels or a decompression
bomb. No face is not an error: ``faces`` is ``[]``.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import html
import logging
import math
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import uvicorn
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

from agegender import __version__
from agegender.commands.serve_video import MAX_VIDEO_MB, add_video_routes
from agegender.commands.uploads import (
    ERRORS,
    MAX_IMAGE_PIXELS,
    MAX_REQUEST_PIXELS,
    ImageError,
    check_upload,
    decode_upload,
    too_large,
)
from agegender.commands.web import BodyLimit, Guard, HeaderDeadline, allowed_hosts
from agegender.errors import ConfigError
from agegender.predict import Predictor

MAX_UPLOAD_MB = 10.0
MAX_BATCH = 16  # images per /api/predict/batch request
NETWORK_BATCH = 32  # queued uploads that go through the network together
PAGE = Path(__file__).resolve().parents[1] / "assets" / "index.html"

log = logging.getLogger("agegender.serve")


def docs_page(schema: dict[str, Any]) -> str:
    """The API reference, one self-contained HTML page made from the OpenAPI schema."""
    esc = html.escape
    parts = [
        "<!doctype html><meta charset=utf-8><title>agegender API</title>",
        "<style>body{font:15px system-ui,sans-serif;max-width:52em;margin:2em auto;padding:0 1em}"
        "code{background:#eee;padding:0 .2em}h2{margin-top:2em}</style>",
        f"<h1>{esc(schema['info']['title'])} {esc(schema['info']['version'])}</h1>",
        f"<p>{esc(schema['info'].get('description', ''))} The schema: "
        "<a href=/openapi.json><code>/openapi.json</code></a>.</p>",
    ]
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            parts.append(f"<h2><code>{method.upper()} {esc(path)}</code></h2>")
            parts.append(f"<p>{esc(op.get('description') or op.get('summary', ''))}</p>")
            codes = ", ".join(
                f"<b>{esc(code)}</b> {esc(r.get('description', ''))}"
                for code, r in op.get("responses", {}).items()
            )
            parts.append(f"<p>Answers: {codes}.</p>")
    return "\n".join(parts)


class _Batcher:
    """Runs uploads through the predictor in a thread pool, several at a time.

    Uploads that arrive while the network is busy wait in ``pending`` and go through together in
    the next batch (one forward pass), which keeps latency flat under load; an idle service runs
    a lone upload at once, without waiting to fill a batch. At most ``capacity`` requests may be
    inside (running or waiting); one more gets 503 at once. Only the event loop's thread touches
    the counters, so they need no lock.
    """

    def __init__(
        self,
        run: Callable[[list[tuple[bytes, bool]]], list[Any]],
        pool: ThreadPoolExecutor,
        workers: int,
        capacity: int,
        max_batch: int,
    ) -> None:
        self.run, self.pool, self.workers = run, pool, workers
        self.capacity, self.max_batch = capacity, max_batch
        self.pending: deque[tuple[tuple[bytes, bool], asyncio.Future]] = deque()
        self.inside = 0
        self.draining = 0  # _drain tasks running
        self.tasks: set[asyncio.Task] = set()  # strong references, or the loop may drop them

    async def submit(self, items: list[tuple[bytes, bool]]) -> list[Any]:
        """One result per ``(image bytes, aligned)``: a dict, or the exception it raised."""
        if self.inside >= self.capacity:
            raise HTTPException(503, "server busy, retry shortly", headers={"Retry-After": "1"})
        self.inside += 1
        try:
            loop = asyncio.get_running_loop()
            futures = []
            for item in items:
                futures.append(loop.create_future())
                self.pending.append((item, futures[-1]))
            while self.draining < self.workers and self.pending:
                self.draining += 1
                task = asyncio.create_task(self._drain())
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            return list(await asyncio.gather(*futures))
        finally:
            self.inside -= 1

    async def call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` in the pool, on its own (not batched), admitted as an upload is: 503 when
        the service is full."""
        if self.inside >= self.capacity:
            raise HTTPException(503, "server busy, retry shortly", headers={"Retry-After": "1"})
        self.inside += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn)
        finally:
            self.inside -= 1

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                n = min(len(self.pending), self.max_batch)
                batch = [self.pending.popleft() for _ in range(n)]
                try:
                    results = await loop.run_in_executor(self.pool, self.run, [b[0] for b in batch])
                except Exception as e:  # a bug, not bad input: each request answers 500
                    results = [e] * len(batch)
                for (_, future), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)
        finally:
            # no await between the empty-queue check and this: a submit() in between cannot
            # see this task as still draining and leave its upload waiting forever
            self.draining -= 1


def _check_options(
    workers: int = 1,
    queue: int = 16,
    max_upload_mb: float = MAX_UPLOAD_MB,
    max_batch: int = MAX_BATCH,
    max_video_mb: float = MAX_VIDEO_MB,
    **_: Any,
) -> None:
    """Refuse limits the service cannot run with, before the model is loaded."""
    if workers < 1:
        raise ConfigError(f"workers must be 1 or more, got {workers}")
    if queue < 0:
        raise ConfigError(f"queue must be 0 or more, got {queue}")
    # a limit under 1 kB would refuse every image (the smallest JPEG face is larger)
    if not (math.isfinite(max_upload_mb) and max_upload_mb >= 0.001):
        raise ConfigError(f"max_upload_mb must be 0.001 MB (1 kB) or more, got {max_upload_mb}")
    if max_batch < 1:
        raise ConfigError(f"max_batch must be 1 or more, got {max_batch}")
    if not (math.isfinite(max_video_mb) and max_video_mb >= 0.01):
        raise ConfigError(f"max_video_mb must be 0.01 MB or more, got {max_video_mb}")


@dataclass(frozen=True)
class Limits:
    """What one request may cost: bytes per file, files per batch, pixels per image and in
    all."""

    max_bytes: int
    max_batch: int
    max_pixels: int
    max_video_bytes: int = int(MAX_VIDEO_MB * 1e6)
    max_request_pixels: int = MAX_REQUEST_PIXELS

    def within_budget(self, uploads: list[bytes]) -> list[ImageError | None]:
        """Per upload of a batch: None, or the 422 of one past the request's pixel budget
        (read from the headers; a file that cannot be read is left to the decoder's answer)."""
        spent, out = 0, []
        for data in uploads:
            try:
                w, h = check_upload(data, self.max_pixels)
            except ImageError:
                out.append(None)
                continue
            spent += w * h
            over = spent > self.max_request_pixels
            budget = f"{self.max_request_pixels / 1e6:g} MP"
            out.append(ImageError(422, f"past the request's budget of {budget}") if over else None)
        return out

    def body(self, path: str) -> tuple[int, str] | None:
        """The body limit of ``path`` and its 413 message (see :class:`_BodyLimit`)."""
        # multipart framing adds a few hundred bytes per part; 64 kB of slack is plenty
        if path in ("/api/predict", "/api/track"):
            return self.max_bytes + 65536, too_large(self.max_bytes)
        if path == "/api/video":
            limit = f"{self.max_video_bytes / 1e6:g} MB"
            return self.max_video_bytes + 65536, f"video too large: the limit is {limit}"
        if path == "/api/predict/batch":
            total = self.max_batch * self.max_bytes
            return total + 65536, (
                f"batch too large: the limit is {total / 1e6:g} MB per request "
                f"({self.max_batch} images of {self.max_bytes / 1e6:g} MB)"
            )
        return None


def run_batch(
    predictor: Predictor, max_pixels: int, items: list[tuple[bytes, bool]]
) -> list[dict[str, Any] | Exception]:
    """Decode, then detect and predict every ``(image bytes, aligned)`` in one batch: a result
    dict or an :class:`ImageError` per item. Runs in a pool thread.

    An aligned face goes to the predictor as its file's bytes, so it is decoded exactly as
    ``agegender predict --aligned`` and ``prepare`` decode it (not through RGB).
    """
    start = time.perf_counter()
    out: list[Any] = [None] * len(items)
    inputs: dict[int, np.ndarray | bytes] = {}
    sizes: dict[int, tuple[int, int]] = {}
    for i, (data, aligned) in enumerate(items):
        try:
            if aligned:
                sizes[i], inputs[i] = check_upload(data, max_pixels), data
            else:
                inputs[i] = decode_upload(data, max_pixels)
                sizes[i] = (inputs[i].shape[1], inputs[i].shape[0])
        except ImageError as e:
            out[i] = e
    for aligned in (False, True):
        index = [i for i in inputs if items[i][1] == aligned]
        if not index:
            continue
        found = predictor.predict_batch([inputs[i] for i in index], aligned=aligned)
        for i, faces in zip(index, found):
            out[i] = ImageError(422, str(faces)) if isinstance(faces, Exception) else faces
    ms = round((time.perf_counter() - start) * 1e3, 2)
    for i, (w, h) in sizes.items():
        if isinstance(out[i], list):
            out[i] = {"faces": [f.to_dict() for f in out[i]], "width": w, "height": h, "ms": ms}
    return out


def create_app(
    model: str | os.PathLike = "default",
    *,
    predictor: Predictor | None = None,
    workers: int = 1,
    queue: int = 16,
    max_upload_mb: float = MAX_UPLOAD_MB,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_batch: int = MAX_BATCH,
    max_video_mb: float = MAX_VIDEO_MB,
    device: str = "auto",
    backend: str = "onnx",
    tta: bool | None = None,
    amp: str = "auto",
    precision: str = "auto",
    spin: bool = False,
    host: str = "127.0.0.1",
    allow_hosts: tuple[str, ...] = (),
    allow_origins: tuple[str, ...] = (),
    api_key: str | None = None,
) -> Any:
    """The FastAPI application (serve it with ``uvicorn``; ``agegender serve`` does).

    Args:
        model: ``default`` (bundled), a run folder or a checkpoint; ignored with ``predictor``.
        predictor: an already loaded :class:`Predictor` to share (tests, embedding).
        workers: inference threads. On a small CPU one thread running torch on every core beats
            several competing ones; use more with the ONNX backend or a GPU.
        queue: requests that may wait for a thread; beyond ``workers + queue`` in flight the
            service answers 503 with ``Retry-After``.
        max_upload_mb: largest accepted file; a larger one in a batch gets its own 413 result.
        max_batch: files per batch request; a batch body over ``max_batch * max_upload_mb`` is
            refused whole with 413.
        max_pixels: largest accepted image (width x height), checked before decoding; a batch
            may hold ``MAX_REQUEST_PIXELS`` in all. A video's frames may be as large.
        max_video_mb: largest clip ``/api/video`` accepts (see
            :mod:`agegender.commands.serve_video` for its other limits).
        device, backend, tta, amp, precision: as :meth:`Predictor.load` takes them.
        spin: idle ONNX Runtime threads spin for work; off by default, so that they leave
            the cores to the threads that parse and decode uploads (``benchmarks/spin.py``).
        host: the interface the service is bound to: only its names are answered (a web page
            cannot drive a loopback service through DNS rebinding), with ``allow_hosts``.
        allow_origins: web origins besides the service's own whose pages may post to it.
        api_key: required on ``/api/`` requests (``Authorization: Bearer KEY``).
    """
    _check_options(workers, queue, max_upload_mb, max_batch, max_video_mb)
    if predictor is None:
        predictor = Predictor.load(
            model, device=device, backend=backend, tta=tta, amp=amp, precision=precision,
            spin=spin,
        )  # fmt: skip
    pool = ThreadPoolExecutor(workers, thread_name_prefix="agegender")
    limits = Limits(int(max_upload_mb * 1e6), max_batch, max_pixels, int(max_video_mb * 1e6))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="agegender",
        version=__version__,
        description="Age and gender of every face in a photo (UTKFace-trained multi-task CNN).",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's page loads its scripts from a CDN: /docs is ours, local
        redoc_url=None,
    )
    app.state.predictor = predictor
    app.add_middleware(BodyLimit, limit=limits.body)
    hosts = allowed_hosts(host, allow_hosts)
    app.add_middleware(Guard, hosts=hosts, origins=allow_origins, api_key=api_key or None)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # one line, as every other error (FastAPI's own answer is a list of objects)
        problems = [f"{e.get('msg', 'invalid')}: {'.'.join(map(str, e.get('loc', ())[1:]))}"
                    for e in exc.errors()]  # fmt: skip
        return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, 422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    run = functools.partial(run_batch, predictor, max_pixels)
    batcher = _Batcher(run, pool, workers, workers + queue, NETWORK_BATCH)
    settings = {"workers": workers, "queue": queue, "max_upload_mb": max_upload_mb}
    settings["max_video_mb"] = max_video_mb
    settings["api_key"] = bool(api_key)
    _add_routes(app, predictor, batcher, limits, settings)
    add_video_routes(app, predictor, batcher.call, limits.max_bytes, limits.max_video_bytes,
                     max_pixels)  # fmt: skip
    return app


def _add_routes(
    app: FastAPI, predictor: Predictor, batcher: _Batcher, limits: Limits, settings: dict
) -> None:
    """The page, ``/health`` and the two prediction endpoints."""
    model_name = predictor.meta.get("model", {}).get("name", "?")

    async def read(upload: UploadFile) -> bytes:
        data = await upload.read(limits.max_bytes + 1)
        if len(data) > limits.max_bytes:
            raise ImageError(413, too_large(limits.max_bytes))
        return data

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        """The API described from its OpenAPI schema: one local page, no script."""
        return HTMLResponse(docs_page(app.openapi()))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and what is loaded."""
        backend_name = type(predictor.backend).__name__.strip("_").removesuffix("Backend")
        return {
            "status": "ok",
            "model": model_name,
            "checkpoint": predictor.checkpoint.name,
            "version": __version__,
            "device": str(getattr(predictor.backend, "device", "cpu")),
            "backend": backend_name.lower(),
            "input": {"size": predictor.size, "color": predictor.color},
            "tta": predictor.tta,
            "spin": getattr(predictor.backend, "spin", None),  # ONNX Runtime's; torch: None
            **settings,
            "in_flight": batcher.inside,
        }

    @app.post("/api/predict", responses=ERRORS)
    async def predict(
        image: Annotated[UploadFile, File(description="JPEG, PNG or WebP")],
        aligned: Annotated[bool, Form(description="a UTKFace-style face crop: no detection")] = (
            False
        ),
    ) -> dict[str, Any]:
        """Every face in one image: box, age (with a 90 % interval), gender, p_female.
        ``ms`` is the server's time on the batch the image went through."""
        try:
            data = await read(image)
        except ImageError as e:
            raise HTTPException(e.status, e.detail) from None
        (result,) = await batcher.submit([(data, aligned)])
        if isinstance(result, ImageError):
            raise HTTPException(result.status, result.detail)
        if isinstance(result, Exception):
            raise result
        return result

    @app.post("/api/predict/batch", responses=ERRORS)
    async def predict_batch(
        images: Annotated[list[UploadFile], File(description="JPEG, PNG or WebP files")],
        aligned: Annotated[bool, Form()] = False,
    ) -> dict[str, Any]:
        """Several images; each result has ``error``/``status`` set when that image failed."""
        if len(images) > limits.max_batch:
            raise HTTPException(413, f"too many images: at most {limits.max_batch} per request")
        answers: list[Any] = []  # an oversized file's error, or None until it is predicted
        uploads: list[bytes | None] = []
        for upload in images:
            try:
                uploads.append(await read(upload))
                answers.append(None)
            except ImageError as e:
                uploads.append(None)
                answers.append(e)
        budget = limits.within_budget([u for u in uploads if u is not None])
        refused = iter(budget)
        answers = [next(refused) if u is not None else a for u, a in zip(uploads, answers)]
        items = [(u, aligned) for u, a in zip(uploads, answers) if u is not None and a is None]
        start = time.perf_counter()
        # a batch of only oversized files never takes a place in the queue
        predicted = iter(await batcher.submit(items) if items else [])
        answers = [next(predicted) if a is None else a for a in answers]
        results = []
        for upload, res in zip(images, answers):
            if isinstance(res, ImageError):
                res = {"faces": [], "error": res.detail, "status": res.status}
            elif isinstance(res, Exception):
                raise res
            else:
                res = {**res, "error": None, "status": 200}
            results.append({"filename": upload.filename, **res})
        return {"results": results, "ms": round((time.perf_counter() - start) * 1e3, 2)}


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    **kwargs: Any,
) -> None:
    """Load the model, then serve :func:`create_app` with uvicorn until interrupted.

    Bad options and a port that cannot be bound raise :class:`ConfigError` before the model is
    loaded, and before the address is announced. ``port=0`` takes any free port. The API key
    comes from ``api_key`` or the environment's ``AGEGENDER_API_KEY``.
    """
    _check_options(**kwargs)
    kwargs["api_key"] = kwargs.get("api_key") or os.environ.get("AGEGENDER_API_KEY") or None
    sock = _bind(host, port)
    try:
        app = create_app(host=host, **kwargs)
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=HeaderDeadline)
        server = uvicorn.Server(config)
        url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
        print(f"agegender: serving on {url} (API docs at /docs)", flush=True)
        if host in ("0.0.0.0", "::") and not kwargs["api_key"]:
            print(
                "agegender: every interface, no --api-key: anyone who can reach this machine "
                "can use the service",
                file=sys.stderr,
                flush=True,
            )
        with suppress(KeyboardInterrupt):  # a clean stop, as uvicorn.run treats it
            server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:  # uvicorn logged why (a failing lifespan), as uvicorn.run exits
        raise SystemExit(3)


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``(host, port)`` for uvicorn to listen on. Binding here, not in uvicorn,
    turns a busy port into one line and exit 2 instead of a log line and exit 3 after the model
    has loaded and the address was announced."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"port must be 0-65535 (0: any free port), got {port}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    # as uvicorn binds: a port left in TIME_WAIT by the previous run is free, a listening one not
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} is in use: pick another with --port") from None
        if e.errno == errno.EACCES:
            raise ConfigError(f"no permission to use port {port} (below 1024 needs root)") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
