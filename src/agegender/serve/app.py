"""HTTP service and browser page: ``agegender serve``.

:func:`create_app` builds a FastAPI app around one
:class:`~agegender.inference.predictor.Predictor`, loaded once at start-up and shared by every
request (the same object the CLI and the Python API use):

- ``POST /api/predict``: multipart field ``image`` (JPEG, PNG or WebP), optional form field
  ``aligned=true``; answers ``{"faces": [...], "faces_left_out": N, "width": W, "height": H,
  "ms": float}`` with the same face objects as ``agegender predict --output`` (at most
  ``max_faces``, the best; ``faces_left_out`` counts the others).
- ``POST /api/predict/batch``: up to ``max_batch`` ``images`` fields; one result per image, and a
  bad image (an oversized one included) gets its ``error`` and ``status`` without failing the
  others. Only a request over ``max_batch`` files' worth of bytes in total is refused whole.
- ``POST /api/track`` (a webcam's frames, tracked per client session) and ``POST /api/video``
  (an uploaded clip, answered with its persons): see :mod:`agegender.serve.video`.
- ``GET /health`` (and HEAD), ``GET /docs`` (OpenAPI) and ``GET /`` (and HEAD): a single
  self-contained page (no build step, no CDN) to pick, drop or photograph an image and see the
  faces labelled, follow the faces of the webcam live, or send a clip.

Decoding, detection and the network run in a small thread pool so the event loop stays free;
uploads that queue up while the network is busy go through it together as one batch, and a
bounded queue answers 503 at once when full, before a body is read, instead of piling requests
up. Every upload goes through one admission (:mod:`agegender.serve.uploads`), and every limit
is a field of :class:`~agegender.serve.uploads.ServiceLimits`, named with the option that
raises it when it refuses. Bad input gets a JSON ``{"detail": "..."}`` with its status and
never a traceback: 413 over the upload limit, 415 not an accepted image format, 422
truncated/corrupt data, too many pixels or a decompression bomb. No face is not an error:
``faces`` is ``[]``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import html
import logging
import os
import re
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import uvicorn
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from agegender import __version__
from agegender.core.errors import ConfigError
from agegender.inference.options import InferenceOptions
from agegender.inference.predictor import Predictor
from agegender.serve.guards import (
    SECURITY_HEADERS,
    Admission,
    Guard,
    Lane,
    RateLimitedLog,
    Route,
    allowed_hosts,
    protocol_for,
    quiet_resource_errors,
)
from agegender.serve.uploads import (
    ERRORS,
    MAX_UPLOAD_MB,
    MAX_VIDEO_MB,
    QUEUE,
    WORKERS,
    ImageError,
    ServiceLimits,
    admit_uploads,
    check_upload,
    decode_upload,
    too_large,
)
from agegender.serve.video import add_video_routes

NETWORK_BATCH = 32  # queued uploads that go through the network together
PAGE = Path(__file__).resolve().parents[1] / "assets" / "index.html"

log = logging.getLogger("agegender.serve")


#: reStructuredText's inline literal, as the route docstrings write it: ``x``
_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)


def _text(text: str) -> str:
    """A docstring as HTML: escaped, each ``x`` shown as <code>x</code> (not with its marks)."""
    return _LITERAL.sub(r"<code>\1</code>", html.escape(text))


def docs_page(schema: dict[str, Any]) -> str:
    """The API reference, one self-contained HTML page made from the OpenAPI schema."""
    esc = html.escape
    parts = [
        "<!doctype html><meta charset=utf-8><title>agegender API</title>",
        "<style>body{font:15px system-ui,sans-serif;max-width:52em;margin:2em auto;padding:0 1em}"
        "code{background:#eee;padding:0 .2em}h2{margin-top:2em}</style>",
        f"<h1>{esc(schema['info']['title'])} {esc(schema['info']['version'])}</h1>",
        f"<p>{_text(schema['info'].get('description', ''))} The schema: "
        "<a href=/openapi.json><code>/openapi.json</code></a>.</p>",
    ]
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            parts.append(f"<h2><code>{method.upper()} {esc(path)}</code></h2>")
            parts.append(f"<p>{_text(op.get('description') or op.get('summary', ''))}</p>")
            codes = ", ".join(
                f"<b>{esc(code)}</b> {_text(r.get('description', ''))}"
                for code, r in op.get("responses", {}).items()
            )
            parts.append(f"<p>Answers: {codes}.</p>")
    return "\n".join(parts)


class _Batcher:
    """Runs uploads through the predictor in a thread pool, several at a time.

    Uploads that arrive while the network is busy wait in ``pending`` and go through together in
    the next batch (one forward pass), which keeps latency flat under load; an idle service runs
    a lone upload at once, without waiting to fill a batch. The requests were admitted before
    (:class:`~agegender.serve.guards.Admission`: 503 past the queue). Only the event loop's
    thread touches the counters, so they need no lock.
    """

    def __init__(
        self,
        run: Callable[[list[tuple[bytes, bool]]], list[Any]],
        pool: ThreadPoolExecutor,
        workers: int,
        max_batch: int,
    ) -> None:
        self.run, self.pool, self.workers, self.max_batch = run, pool, workers, max_batch
        self.pending: deque[tuple[tuple[bytes, bool], asyncio.Future]] = deque()
        self.draining = 0  # _drain tasks running
        self.tasks: set[asyncio.Task] = set()  # strong references, or the loop may drop them

    async def submit(self, items: list[tuple[bytes, bool]]) -> list[Any]:
        """One result per ``(image bytes, aligned)``: a dict, or the exception it raised."""
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

    async def call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` in the pool, on its own (not batched)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

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


def run_batch(
    predictor: Predictor, limits: ServiceLimits, items: list[tuple[bytes, bool]]
) -> list[dict[str, Any] | Exception]:
    """Decode, then detect and predict every ``(image bytes, aligned)`` in one batch: a result
    dict or an :class:`ImageError` per item. Runs in a pool thread.

    An aligned face goes to the predictor as its file's bytes, so it is decoded exactly as
    ``agegender predict --aligned`` and ``prepare`` decode it (not through RGB). An image keeps
    its ``max_faces`` best detections; ``faces_left_out`` counts the others.
    """
    start = time.perf_counter()
    out: list[Any] = [None] * len(items)
    inputs: dict[int, np.ndarray | bytes] = {}
    sizes: dict[int, tuple[int, int]] = {}
    for i, (data, aligned) in enumerate(items):
        try:
            if aligned:
                sizes[i], inputs[i] = check_upload(data, limits.max_pixels), data
            else:
                inputs[i] = decode_upload(data, limits.max_pixels)
                sizes[i] = (inputs[i].shape[1], inputs[i].shape[0])
        except ImageError as e:
            out[i] = e
    left_out = dict.fromkeys(inputs, 0)
    for aligned in (False, True):
        index = [i for i in inputs if items[i][1] == aligned]
        if not index:
            continue
        located = predictor.locate_all([inputs[i] for i in index], aligned=aligned)
        for k, i in enumerate(index):
            located[k], left_out[i] = _keep_best(located[k], limits.max_faces)
        for i, faces in zip(index, predictor.finish(located)):
            out[i] = ImageError(422, str(faces)) if isinstance(faces, Exception) else faces
    ms = round((time.perf_counter() - start) * 1e3, 2)
    for i, (w, h) in sizes.items():
        if isinstance(out[i], list):
            faces = [f.to_dict() for f in out[i]]
            out[i] = {"faces": faces, "faces_left_out": left_out[i], "width": w, "height": h}
            out[i]["ms"] = ms
    return out


def _keep_best(located: Any, max_faces: int) -> tuple[Any, int]:
    """One image's ``(crops, boxes, scores)`` cut to its ``max_faces`` best (the detector
    gives them best first), and how many were left out; an exception passes as it is."""
    if isinstance(located, Exception) or len(located[1]) <= max_faces:
        return located, 0
    crops, boxes, scores = located
    return (crops[:max_faces], boxes[:max_faces], scores[:max_faces]), len(boxes) - max_faces


def _limits(limits: ServiceLimits | None, changes: dict[str, Any]) -> ServiceLimits:
    """``limits`` (or the defaults) with ``changes``: an unknown name is a one-line error."""
    known = {f.name for f in dataclasses.fields(ServiceLimits)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ConfigError(
            f"unknown service setting {unknown[0]!r}; valid: {', '.join(sorted(known))}"
        )
    return (limits or ServiceLimits()).replace(**changes)


def _routes(limits: ServiceLimits, photos: Lane, clips: Lane) -> Callable[[str], Route | None]:
    """What :class:`Admission` applies to each upload path."""
    slack = 65536  # multipart framing adds a few hundred bytes per part; 64 kB is plenty
    batch = limits.max_batch * limits.max_bytes
    table = {
        "/api/predict": Route(photos, limits.max_bytes + slack, too_large(limits.max_bytes)),
        "/api/track": Route(photos, limits.max_bytes + slack, too_large(limits.max_bytes)),
        "/api/predict/batch": Route(photos, batch + slack, (
            f"batch too large: the limit is {batch / 1e6:g} MB per request ({limits.max_batch} "
            f"images of {limits.max_bytes / 1e6:g} MB: --max-batch, --max-upload-mb)"
        )),
        "/api/video": Route(clips, limits.max_video_bytes + slack, (
            f"video too large: the limit is {limits.max_video_mb:g} MB (--max-video-mb)"
        )),
    }  # fmt: skip
    return table.get


def create_app(
    options: InferenceOptions | None = None,
    *,
    predictor: Predictor | None = None,
    limits: ServiceLimits | None = None,
    host: str = "127.0.0.1",
    allow_hosts: tuple[str, ...] = (),
    allow_origins: tuple[str, ...] = (),
    api_key: str | None = None,
    **changes: Any,
) -> Any:
    """The FastAPI application (serve it with :func:`uvicorn_config`; :func:`serve` does).

    Args:
        options: the model and how it runs, loaded through
            :func:`agegender.training.loading.open_predictor` (None: the defaults); ignored
            with ``predictor``.
        predictor: an already loaded :class:`Predictor` to share (tests, embedding).
        limits: the service's :class:`ServiceLimits`; ``changes`` are some of its fields
            (``max_upload_mb=1``) applied to it.
        host: the interface the service is bound to: only its names are answered (a web page
            cannot drive a loopback service through DNS rebinding), with ``allow_hosts``.
        allow_origins: web origins besides the service's own whose pages may post to it.
        api_key: required on ``/api/`` requests (``Authorization: Bearer KEY``).
    """
    limits = _limits(limits, changes)
    if predictor is None:
        from agegender.training.loading import open_predictor  # torch only for what needs it

        predictor = open_predictor(options or InferenceOptions())
    pool = ThreadPoolExecutor(limits.workers, thread_name_prefix="agegender")
    app = _fastapi(pool)
    app.state.predictor, app.state.limits = predictor, limits
    photos = Lane(limits.workers + limits.queue, limits.buffered_bytes)
    clips_busy = f"busy with other clips, retry shortly (--max-clips {limits.max_clips})"
    clips = Lane(limits.max_clips, 2**62, clips_busy)  # clips go to disk, not to memory
    app.add_middleware(Admission, routes=_routes(limits, photos, clips))
    hosts = allowed_hosts(host, allow_hosts)
    app.add_middleware(Guard, hosts=hosts, origins=allow_origins, api_key=api_key or None)
    _add_error_handlers(app)
    batcher = _Batcher(functools.partial(run_batch, predictor, limits), pool, limits.workers,
                       NETWORK_BATCH)  # fmt: skip
    settings = {"workers": limits.workers, "queue": limits.queue}
    settings.update(max_upload_mb=limits.max_upload_mb, max_video_mb=limits.max_video_mb)
    settings["api_key"] = bool(api_key)
    _add_pages(app, predictor, photos, settings)
    _add_private_site(app, predictor)
    _add_predict_routes(app, batcher, limits)
    add_video_routes(app, predictor, batcher.call, limits)
    return app


def _fastapi(pool: ThreadPoolExecutor) -> FastAPI:
    """The bare application, which shuts ``pool`` down when it stops."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        quiet_resource_errors(asyncio.get_running_loop(), RateLimitedLog())
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    return FastAPI(
        title="agegender",
        version=__version__,
        description="Age and gender of every face in a photo (UTKFace-trained multi-task CNN).",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's page loads its scripts from a CDN: /docs is ours, local
        redoc_url=None,
    )


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # one line, as every other error (FastAPI's own answer is a list of objects)
        problems = [f"{e.get('msg', 'invalid')}: {'.'.join(map(str, e.get('loc', ())[1:]))}"
                    for e in exc.errors()]  # fmt: skip
        return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, 422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # answered from outside every middleware, the Guard's headers included: its own here
        log.exception("unhandled error on %s", request.url.path)
        headers = {k.decode(): v.decode() for k, v in SECURITY_HEADERS}
        return JSONResponse({"detail": "internal server error"}, 500, headers=headers)


def _add_private_site(app: FastAPI, predictor: Predictor) -> None:
    """``/private/``: the page of ``agegender site``, which runs the served model in the
    visitor's browser (its ONNX file; the bundled default's when it runs on torch), so a
    photo never leaves the device."""
    from fastapi.staticfiles import StaticFiles

    from agegender.serve.site import write_site

    served = getattr(predictor.backend, "path", None)
    model = served if served is not None and str(served).endswith(".onnx") else "default"
    folder = tempfile.TemporaryDirectory(prefix="agegender-site-")
    app.state.private_site = folder  # removed with the app
    site = write_site(Path(folder.name) / "site", model=model)
    app.mount("/private", StaticFiles(directory=site, html=True), name="private")


def _add_pages(app: FastAPI, predictor: Predictor, photos: Lane, settings: dict) -> None:
    """The page, ``/docs`` and ``/health`` (each answering HEAD too, as probes send it)."""
    model_name = predictor.meta.get("model", {}).get("name", "?")

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse,
                   include_in_schema=False)  # fmt: skip
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    # the look and the face labels the page shares with the private one (agegender site)
    shared = {"faces.css": "text/css", "faces.js": "text/javascript"}

    @app.api_route("/assets/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in shared:
            raise HTTPException(404, "no such file")
        text = (PAGE.parent / name).read_text(encoding="utf-8")
        return Response(text, media_type=shared[name])

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
            "in_flight": photos.inside,
        }

    # HEAD beside GET, out of the schema (a HEAD answer has no body to validate)
    app.head("/health", include_in_schema=False)(health)


def _answer(result: Any) -> Any:
    """A prediction's result as the API answers it: an :class:`ImageError` as its status."""
    if isinstance(result, ImageError):
        raise HTTPException(result.status, result.detail)
    if isinstance(result, Exception):
        raise result
    return result


def _add_predict_routes(app: FastAPI, batcher: _Batcher, limits: ServiceLimits) -> None:
    """``/api/predict`` and ``/api/predict/batch``: admitted by :class:`Admission` and
    :func:`admit_uploads`, decoded and predicted in the pool."""

    @app.post("/api/predict", responses=ERRORS)
    async def predict(
        image: Annotated[UploadFile, File(description="JPEG, PNG or WebP")],
        aligned: Annotated[bool, Form(description="a UTKFace-style face crop: no detection")] = (
            False
        ),
    ) -> dict[str, Any]:
        """Every face in one image: box, age (with a 90 % interval), gender, p_female.
        ``ms`` is the server's time on the batch the image went through; ``faces_left_out``
        counts the faces past ``--max-faces``."""
        (data,) = await admit_uploads([image], limits)
        (result,) = await batcher.submit([(_answer(data), aligned)])
        return _answer(result)

    @app.post("/api/predict/batch", responses=ERRORS)
    async def predict_batch(
        images: Annotated[list[UploadFile], File(description="JPEG, PNG or WebP files")],
        aligned: Annotated[bool, Form()] = False,
    ) -> dict[str, Any]:
        """Several images; each result has ``error``/``status`` set when that image failed."""
        if len(images) > limits.max_batch:
            detail = f"too many images: at most {limits.max_batch} per request (--max-batch)"
            raise HTTPException(413, detail)
        start = time.perf_counter()
        answers = await admit_uploads(images, limits)
        items = [(data, aligned) for data in answers if isinstance(data, bytes)]
        # a batch of only refused files never takes a turn in the pool
        predicted = iter(await batcher.submit(items) if items else [])
        answers = [next(predicted) if isinstance(a, bytes) else a for a in answers]
        results = []
        for upload, res in zip(images, answers):
            if isinstance(res, ImageError):
                res = {"faces": [], "error": res.detail, "status": res.status}
            else:
                res = {**_answer(res), "error": None, "status": 200}
            results.append({"filename": upload.filename, **res})
        return {"results": results, "ms": round((time.perf_counter() - start) * 1e3, 2)}


DEFAULTS = ServiceLimits()


def uvicorn_config(
    app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "info"
) -> uvicorn.Config:
    """uvicorn's settings for an app of :func:`create_app`: its protocol with the limits'
    deadlines and connection cap."""
    limits: ServiceLimits = app.state.limits
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=protocol_for(limits),
        # past the cap GuardedH11 answers 503 itself, with the security headers (uvicorn's
        # own 503 has none); this is only a backstop for requests pipelined beyond it
        limit_concurrency=2 * limits.max_connections + 8,
    )  # fmt: skip


def serve(
    options: InferenceOptions | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = WORKERS,
    queue: int = QUEUE,
    max_upload_mb: float = MAX_UPLOAD_MB,
    max_video_mb: float = MAX_VIDEO_MB,
    api_key: str | None = None,
    allow_hosts: tuple[str, ...] = (),
    allow_origins: tuple[str, ...] = (),
    limits: ServiceLimits | None = None,
    log_level: str = "info",
) -> None:
    """Load the model, then serve :func:`create_app` with uvicorn until interrupted.

    ``workers``, ``queue``, ``max_upload_mb`` and ``max_video_mb`` are :class:`ServiceLimits`
    fields, applied to ``limits`` (the defaults when None) where they differ from their
    defaults. Bad limits and a port that cannot be bound raise :class:`ConfigError` before the
    model is loaded, and before the address is announced. ``port=0`` takes any free port. The
    API key comes from ``api_key`` or the environment's ``AGEGENDER_API_KEY``.
    """
    given = {"workers": workers, "queue": queue, "max_upload_mb": max_upload_mb}
    given["max_video_mb"] = max_video_mb
    changes = {k: v for k, v in given.items() if v != getattr(DEFAULTS, k)}
    limits = _limits(limits, changes)
    api_key = api_key or os.environ.get("AGEGENDER_API_KEY") or None
    sock = _bind(host, port)
    try:
        app = create_app(options, limits=limits, host=host, api_key=api_key,
                         allow_hosts=allow_hosts, allow_origins=allow_origins)  # fmt: skip
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn_config(app, host, port, log_level))
        url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
        print(f"agegender: serving on {url} (API docs at /docs)", flush=True)
        if host in ("0.0.0.0", "::") and not api_key:
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
