"""``agegender serve``: the web page and the HTTP API over one loaded model."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re

from agegender.cli.args import Handler, default_of, inference_options, options_from

AT = "agegender.serve.app:serve"


def add_serve(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--host", default=default_of(AT, "host"), help="interface (0.0.0.0: every one)")
    p.add_argument("--port", type=int, default=default_of(AT, "port"), help="TCP port (0: any)")
    p.add_argument(
        "--request-threads",
        dest="workers",
        type=int,
        default=default_of(AT, "workers"),
        metavar="N",
        help="threads that decode, detect and run the model on requests",
    )
    # the option's old name, kept for scripts: predict's --workers counts processes, not threads
    p.add_argument(
        "--workers", dest="workers", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
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
    _limit_options(p)
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
        serve(options_from(a), limits=_limits_from(a), **kw)
        return 0

    return run


#: limits with an option of their own above (their names say more than the field's)
_NAMED = ("workers", "queue", "max_upload_mb", "max_video_mb")


def _limit_help() -> dict[str, str]:
    """Each ServiceLimits field's description, from the class's docstring (one home)."""
    from agegender.serve.uploads import ServiceLimits

    doc = inspect.cleandoc(ServiceLimits.__doc__ or "").split("Attributes:")[-1]
    found: dict[str, str] = {}
    for m in re.finditer(r"^    (\w+): (.*?)(?=^    \w+: |\Z)", doc, re.M | re.S):
        found[m.group(1)] = " ".join(m.group(2).split()).replace("``", "")
    return found


def _limit_options(p: argparse.ArgumentParser) -> None:
    """One option per limit of the service (``--max-pixels``, ``--body-timeout-s`` ...),
    its default the :class:`~agegender.serve.uploads.ServiceLimits` field's."""
    from agegender.serve.uploads import ServiceLimits, flag

    group = p.add_argument_group("limits (each refusal names the option that raises it)")
    helps = _limit_help()
    for f in dataclasses.fields(ServiceLimits):
        if f.name not in _NAMED:
            kind = int if f.type == "int" else float
            group.add_argument(flag(f.name), type=kind, default=f.default, help=helps.get(f.name))


def _limits_from(a: argparse.Namespace):
    from agegender.serve.uploads import ServiceLimits

    names = [f.name for f in dataclasses.fields(ServiceLimits) if f.name not in _NAMED]
    return ServiceLimits(**{n: getattr(a, n) for n in names})


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
