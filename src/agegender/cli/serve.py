"""``agegender serve``: the web page and the HTTP API over one loaded model."""

from __future__ import annotations

import argparse

from agegender.cli.args import Handler, default_of, inference_options, options_from

AT = "agegender.serve.app:serve"


def add_serve(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--host", default=default_of(AT, "host"), help="interface (0.0.0.0: every one)")
    p.add_argument("--port", type=int, default=default_of(AT, "port"), help="TCP port (0: any)")
    p.add_argument("--workers", type=int, default=default_of(AT, "workers"), help="threads")
    p.add_argument("--queue", type=int, default=default_of(AT, "queue"), help="waiting before 503")
    p.add_argument(
        "--max-upload-mb", type=float, default=default_of(AT, "max_upload_mb"), help="per file"
    )
    p.add_argument(
        "--max-video-mb",
        type=float,
        default=default_of(AT, "max_video_mb"),
        help="per clip sent to /api/video",
    )
    inference_options(p)
    p.add_argument(
        "--api-key",
        metavar="KEY",
        help="require it on /api/ requests (Authorization: Bearer KEY); or AGEGENDER_API_KEY",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name to answer besides the interface's own (repeatable)",
    )
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="URL",
        help="a web origin whose pages may post to the API, e.g. https://app.example",
    )

    def run(a: argparse.Namespace) -> int:
        from agegender.serve.app import serve

        keys = ("host", "port", "workers", "queue", "max_upload_mb", "max_video_mb", "api_key")
        kw = {k: getattr(a, k) for k in keys}
        kw.update(allow_hosts=tuple(a.allow_host), allow_origins=tuple(a.allow_origin))
        serve(options_from(a), **kw)
        return 0

    return run


def add_site(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("dir", help="folder to write (empty, or written by agegender site before)")
    p.add_argument(
        "--model", default="default", help="a bundled model's name or an agegender .onnx file"
    )

    def run(a: argparse.Namespace) -> int:
        from agegender.serve.site import write_site

        out = write_site(a.dir, model=a.model)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
        print(f"wrote {out} ({size:.1f} MB): serve it with any static web server, e.g.")
        print(f"  python -m http.server --bind 127.0.0.1 --directory {out}")
        return 0

    return run
