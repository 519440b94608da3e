"""``agegender predict``: photos and folders in, JSON lines, CSV, annotated copies or a table out.

The prediction itself is :class:`agegender.inference.predictor.Predictor`'s; this module is the
command's file handling: which files, where results go (every file through
:func:`agegender.core.fileio.output_path`: atomic, and never over an input), and the worker
processes.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import sys
import threading
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from agegender.core import fileio
from agegender.core.errors import ConfigError, DataError, first_line
from agegender.core.progress import progress_bar
from agegender.inference.draw import annotate
from agegender.inference.face import Face
from agegender.inference.options import InferenceOptions
from agegender.inference.predictor import Predictor
from agegender.inference.runtime import default_threads
from agegender.training.loading import open_predictor
from agegender.vision.scan import find_images

#: one row per face (an image without a face, or unreadable, is one row without one)
CSV_COLUMNS = ("path", "face", "x0", "y0", "x1", "y1", "age", "age_low", "age_high", "gender",
               "p_female", "score", "error")  # fmt: skip
STDOUT = "-"


def output_format(output: str | os.PathLike) -> str:
    """``JSON lines`` or ``CSV``, by ``--output``'s extension (``-``: JSON lines on stdout)."""
    if str(output) == STDOUT:
        return "JSON lines"
    if Path(output).is_dir():
        raise DataError(f"--output {output} is a folder: give a file such as {output}/pred.jsonl")
    kind = fileio.output_kind(output)
    if kind not in ("JSON lines", "CSV"):
        raise ConfigError(f"--output {output}: give FILE.jsonl, FILE.json, FILE.csv or -")
    return kind


def csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet will not run: text starting with = + - @ (or a tab or
    carriage return) gets a leading quote; numbers stay numbers."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def shown(text: str) -> str:
    """``text`` for a terminal: control characters (a newline, an escape sequence) and a
    name's undecodable bytes escaped, so that a file's name cannot forge lines or colours."""
    return "".join(
        c.encode("unicode_escape", "backslashreplace").decode("ascii")
        if unicodedata.category(c)[0] == "C"
        else c
        for c in text
    )


def csv_rows(rec: dict[str, Any]) -> list[list[Any]]:
    """The CSV rows of one image's record (:data:`CSV_COLUMNS`)."""
    blank = [""] * (len(CSV_COLUMNS) - 2)
    if not rec["faces"]:
        return [[csv_cell(v) for v in (rec["path"], *blank, rec["error"] or "")]]
    rows = []
    for i, f in enumerate(rec["faces"], 1):
        low, high = f.get("age_interval") or ("", "")
        cells = (rec["path"], i, *f["box"], f["age"], low, high, f["gender"], f["p_female"],
                 f["score"], "")  # fmt: skip
        rows.append([csv_cell(v) for v in cells])
    return rows


# --------------------------------------------------------------------------- the command


def predict_files(
    paths: list[str | os.PathLike],
    options: InferenceOptions,
    *,
    aligned: bool = False,
    output: str | os.PathLike | None = None,
    annotate_dir: str | os.PathLike | None = None,
    csv_out: str | os.PathLike | None = None,
    batch_size: int = 64,
    quiet: bool = False,
    workers: int = 0,
    ordered: bool = True,
    resume: bool = False,
) -> int:
    """The ``agegender predict`` command; returns the exit code (0 all read, 1 some failed).

    ``output``: by its extension, JSON lines (``.jsonl``, ``.json``; one object per image) or a
    CSV (``.csv``; one row per face); ``-``: JSON lines on stdout; None: a table on stdout.
    ``csv_out``: a CSV besides. Every file is written to a temporary file beside it and moved
    into place when the run ends, so an interrupted run leaves the previous file whole (and
    what it found in ``OUTPUT.partial``). An output or annotated image that would replace an
    input image (by identity: a hard link too), or an existing file of another kind, is
    refused with a :class:`~agegender.core.errors.DataError` before the model loads.

    ``workers``: processes, each with its own model and ``cores / workers`` threads (1: this
    process, decoding in a thread beside the network; 0: :func:`auto_workers`; at most the
    cores this process may use). Results come in input order, or as they are done with
    ``ordered=False``. ``resume``: the images already in the JSON-lines ``output`` (or in
    ``OUTPUT.partial``) are kept and not predicted again. ``options.spin=None`` means sleep
    here: decoding runs in a thread beside the network and needs a core between the network's
    runs (``benchmarks/spin.py``).
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ConfigError(f"--workers must be 0 (auto) or more, got {workers}")
    plan = _Plan.make(paths, output, csv_out, annotate_dir, resume)
    workers = _cap_workers(workers or auto_workers(len(plan.files), aligned))
    options = options.replace(
        detector=None if aligned else options.detector,
        spin=False if options.spin is None else options.spin,
    )
    predictor = open_predictor(options)  # once here: a bad model is one line, an export once
    if workers == 1:
        batches = _pipelined(predictor, plan.files, batch_size, aligned)
    else:
        del predictor  # each worker loads its own
        batches = _in_workers(options, plan.files, batch_size, aligned, workers, ordered)
    # closing: an interruption stops the decoding thread or the worker processes at once
    with _Writers(plan, quiet) as out, contextlib.closing(batches):
        for s, chunk, results in batches:
            for i, (path, res) in enumerate(zip(chunk, results)):
                out.add(path, res, plan.targets[s + i] if plan.targets else None)
    if out.failed:
        print(f"agegender predict: {out.failed} of {len(plan.files)} images could not be read",
              file=sys.stderr)  # fmt: skip
    return 1 if out.failed else 0


def _cap_workers(workers: int) -> int:
    """At most a process per core this process may use: more only share the same cores."""
    cores = default_threads()
    if workers > cores:
        print(f"agegender predict: --workers {workers} lowered to {cores}, the CPUs this "
              "process may use", file=sys.stderr)  # fmt: skip
        return cores
    return workers


@dataclass
class _Plan:
    """What a run reads and writes, every output checked before the model loads."""

    files: list[Path]  # the images still to predict
    inputs: dict[fileio.FileId, Path]  # every image given, by identity
    jsonl: Path | None = None  # --output FILE.jsonl
    csv: Path | None = None  # --output FILE.csv or --csv FILE.csv
    stdout: bool = False  # --output -: JSON lines on stdout
    done: dict[str, str] = field(default_factory=dict)  # --resume: real path -> JSON line
    targets: list[Path] = field(default_factory=list)  # --annotate: each file's copy

    csv_only: bool = False  # --csv without --output: the table is printed too

    @property
    def table(self) -> bool:
        """No --output: a table on stdout (besides a --csv)."""
        return not (self.stdout or self.jsonl) and (self.csv is None or self.csv_only)

    @classmethod
    def make(cls, paths, output, csv_out, annotate_dir, resume: bool) -> _Plan:
        if resume and (output is None or str(output) == STDOUT):
            raise ConfigError("--resume needs --output: the results to continue")
        if resume and output_format(output) != "JSON lines":
            raise ConfigError("--resume continues a JSON-lines --output (FILE.jsonl)")
        if output is not None and csv_out is not None and output_format(output) == "CSV":
            raise ConfigError("--output FILE.csv is the CSV already: leave out --csv")
        files = find_images(paths)
        plan = cls(files, fileio.file_ids(files), stdout=str(output) == STDOUT)
        if output is not None and not plan.stdout:
            kind = output_format(output)
            path = fileio.check_output(output, kind, plan.inputs, "--output")
            plan.jsonl, plan.csv = (path, None) if kind == "JSON lines" else (None, path)
        if csv_out is not None:
            plan.csv = fileio.check_output(csv_out, "CSV", plan.inputs, "--csv")
            plan.csv_only = output is None
        if resume:
            plan.done = _done(Path(output))
            plan.files = [f for f in files if os.path.realpath(f) not in plan.done]
        if annotate_dir:
            plan.targets = _annotated_paths(plan.files, Path(annotate_dir), plan.inputs)
        return plan


def _annotated_paths(files: list[Path], folder: Path, inputs: dict) -> list[Path]:
    """Where each file's annotated copy goes, refusing any that would replace an input."""
    targets, taken = [], set()
    for path in files:
        # a/x.jpg and b/x.png must not overwrite each other (nor X.jpg on a case-blind disk)
        name, k = path.stem, 1
        while name.lower() in taken:
            k += 1
            name = f"{path.stem}-{k}"
        taken.add(name.lower())
        targets.append(fileio.check_output(folder / f"{name}.jpg", "image", inputs, "--annotate"))
    return targets


def _done(output: Path) -> dict[str, str]:
    """Real path -> its JSON line, of the images an earlier run wrote to ``output`` or, when
    it was interrupted, to ``OUTPUT.partial`` (the later of the two); a line cut short is not
    done. By real path: ``./a.jpg``, ``a.jpg`` and a link to it are one image."""
    partial = output.with_name(output.name + ".partial")
    found = [p for p in (output, partial) if p.is_file()]
    if not found:
        return {}
    source = max(found, key=lambda p: p.stat().st_mtime_ns)
    done = {}
    with open(source, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("path"), str) and line.endswith("\n"):
                done[os.path.realpath(rec["path"])] = line
    return done


# --------------------------------------------------------------------------- where results go


class _Writers:
    """The run's outputs: JSON lines, CSV, the table, annotated copies; each file moved into
    place when the run ends, or (JSON lines) kept as ``OUTPUT.partial`` when interrupted."""

    def __init__(self, plan: _Plan, quiet: bool) -> None:
        self.plan, self.failed = plan, 0
        self.jsonl: IO[str] | None = None
        self.csv: Any = None
        self.bar = progress_bar(total=len(plan.files), unit="img", desc="predicting",
                                quiet=quiet or len(plan.files) < 2)  # fmt: skip
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> _Writers:
        plan, stack = self.plan, self.stack
        stack.callback(self.bar.close)
        if plan.jsonl is not None:
            partial = plan.jsonl.with_name(plan.jsonl.name + ".partial")
            self.jsonl = stack.enter_context(fileio.output_file(
                plan.jsonl, "JSON lines", plan.inputs, "--output", partial=partial,
                errors="surrogateescape"))  # fmt: skip
        elif plan.stdout:
            self.jsonl = sys.stdout
        if plan.csv is not None:
            f = stack.enter_context(
                fileio.output_file(
                    plan.csv, "CSV", plan.inputs, "--csv", newline="", errors="surrogateescape"
                )
            )
            self.csv = csv.writer(f)
            self.csv.writerow(CSV_COLUMNS)
        for line in plan.done.values():  # what an earlier run found, kept in every output
            self._write(json.loads(line), line)
        return self

    def __exit__(self, kind: Any, error: Any, tb: Any) -> bool | None:
        finished = self.stack.__exit__(kind, error, tb)  # raises when an output fails
        if self.plan.jsonl is not None:
            partial = self.plan.jsonl.with_name(self.plan.jsonl.name + ".partial")
            if kind is None:  # what an interrupted run left is in the output now
                partial.unlink(missing_ok=True)
            elif partial.is_file():
                print(f"agegender predict: the results so far are in {shown(str(partial))} "
                      "(--resume continues from them)", file=sys.stderr)  # fmt: skip
        return finished

    def add(self, path: Path, result: list[Face] | Exception, target: Path | None) -> None:
        """One image's result, to every output."""
        error, faces = None, []
        if isinstance(result, Exception):
            error, self.failed = first_line(result), self.failed + 1
        else:
            faces = result
        rec = {"path": str(path), "faces": [f.to_dict() for f in faces], "error": error}
        self._write(rec, json.dumps(rec) + "\n")
        if self.plan.table:
            _print_table(path, faces, error)
        if target is not None and error is None:
            with fileio.output_path(target, "image", self.plan.inputs, "--annotate") as tmp:
                annotate(path, faces).save(tmp, format="JPEG", quality=90)
        self.bar.update()

    def _write(self, rec: dict[str, Any], line: str) -> None:
        if self.jsonl is not None:
            self.jsonl.write(line)
        if self.csv is not None:
            self.csv.writerows(csv_rows(rec))


def _print_table(path: Path, faces: list[Face], error: str | None) -> None:
    name = shown(str(path))
    if error:
        print(f"{name}: error: {shown(error)}")
        return
    if not faces:
        print(f"{name}: no face found")
        return
    print(f"{name}: {len(faces)} face{'s' if len(faces) > 1 else ''}")
    for i, f in enumerate(faces, 1):
        box = ", ".join(f"{v:.0f}" for v in f.box)
        interval = f" ({f.age_interval[0]:.0f}-{f.age_interval[1]:.0f})" if f.age_interval else ""
        print(
            f"  {i}. {f.gender:6s} p_female {f.p_female:.2f}  age {f.age:4.1f}{interval}"
            f"  box [{box}]  score {f.score:.2f}"
        )


# --------------------------------------------------------------------------- one process


def _pipelined(predictor: Predictor, files: list[Path], batch_size: int, aligned: bool):
    """``(start, files, results)`` batch after batch, the next batch decoded (and its faces
    found) in a thread while the network runs on this one: decoding and the network overlap,
    and both cores stay busy."""
    starts = range(0, len(files), batch_size)
    with ThreadPoolExecutor(1, thread_name_prefix="agegender-decode") as decoder:
        ahead = decoder.submit(predictor.locate_all, files[:batch_size], aligned)
        for s in starts:
            located = ahead.result()
            if s + batch_size < len(files):
                nxt = files[s + batch_size : s + 2 * batch_size]
                ahead = decoder.submit(predictor.locate_all, nxt, aligned)
            yield s, files[s : s + batch_size], predictor.finish(located)


# --------------------------------------------------------------------------- worker processes

_worker: Predictor | None = None


def _start_worker(options: InferenceOptions) -> None:
    """A worker process's start: its own model, with ``options.threads`` threads (OpenCV's
    too), so that workers x threads stays within the cores. Ctrl-C is the parent's to handle
    (it stops the workers), not each worker's to print a traceback for."""
    global _worker
    import cv2

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(options.threads or 1)
    _worker = open_predictor(options)


def _work(paths: list[str], aligned: bool) -> list:
    """One chunk in a worker: decode, detect, predict; a bad image is its exception."""
    assert _worker is not None
    return [r if not isinstance(r, Exception) else ValueError(str(r) or type(r).__name__)
            for r in _worker.predict_batch(paths, aligned, workers=1)]  # fmt: skip


#: files from which a process per core pays for its start-up (about a second each)
AUTO_WORKERS_FROM = 200


def auto_workers(n_files: int, aligned: bool) -> int:
    """``--workers 0``: what measured fastest (``benchmarks/scale_speed.py``, 2-core Xeon):
    for photos, a process per core (1,500 UTKFace photos: 49 images/s in one process, 89 in
    two: detection and decoding use about a core each); for aligned crops one process, which
    the network alone keeps busy (about 900 crops/s, whole process, with one or two), and one
    for a few files, which would wait for the others' start-up."""
    if aligned or n_files < AUTO_WORKERS_FROM:
        return 1
    return max(1, min(default_threads(), n_files // AUTO_WORKERS_FROM))


def _stop(pool: Any) -> None:
    """End a process pool now, its running chunks too (Ctrl-C, SIGTERM, an error): nothing
    is left running after the command. ``shutdown`` alone would wait for them."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        p.terminate()
    for p in processes:
        p.join(5)


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back for the block, then deliver them: a worker's start-up
    data written halfway (a submit starts a worker) leaves a child that dies with a
    traceback. A no-op outside the main thread, where signals are not handled."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:
            signal.raise_signal(held[0])  # to the handler it had: KeyboardInterrupt, say


@contextlib.contextmanager
def _pool(options: InferenceOptions, workers: int) -> Iterator[Any]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: a forked copy of a process with threads running can deadlock
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker,
                               initargs=(options,))  # fmt: skip
    try:
        yield pool
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown(wait=True)


def _in_workers(options: InferenceOptions, files: list[Path], batch_size: int, aligned: bool,
                workers: int, ordered: bool):  # fmt: skip
    """:func:`_pipelined`'s batches from ``workers`` processes: at most two chunks a worker in
    flight (memory stays flat however many files), yielded in input order or as done."""
    from collections import deque
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    if options.threads is None:
        options = options.replace(threads=max(1, default_threads() // workers))
    chunk = max(1, min(batch_size, -(-len(files) // (4 * workers))))  # every worker gets work
    starts = iter(range(0, len(files), chunk))
    with _pool(options, workers) as pool:
        pending: deque = deque()

        def submit() -> bool:
            s = next(starts, None)
            if s is None:
                return False
            part = files[s : s + chunk]
            with _uninterrupted():
                future = pool.submit(_work, [str(p) for p in part], aligned)
            pending.append((s, part, future))
            return True

        while len(pending) < 2 * workers and submit():
            pass
        try:
            while pending:
                if not ordered:
                    wait([f for _, _, f in pending], return_when=FIRST_COMPLETED)
                    pending.rotate(-next(i for i, (*_, f) in enumerate(pending) if f.done()))
                s, part, future = pending.popleft()
                results = future.result()
                submit()
                yield s, part, results
        except BrokenProcessPool:
            raise DataError(
                "a worker process died (out of memory?): the results so far are kept; "
                "rerun with --resume to continue"
            ) from None
