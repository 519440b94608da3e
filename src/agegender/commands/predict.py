"""``agegender predict``: photos and folders in, JSON lines, annotated copies or a table out.

The prediction itself is :class:`agegender.predict.Predictor`'s; this module is the command's
file handling: which files, where results go, and that nothing given is ever overwritten.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from agegender import fileio
from agegender.draw import annotate
from agegender.errors import ConfigError, DataError, first_line
from agegender.images import find_images
from agegender.predict import Face, Predictor
from agegender.runtime import default_threads

OUTPUT_SUFFIXES = (".jsonl", ".json")  # what --output may replace when the file exists


def _file_key(path: Path) -> tuple[int, int] | None:
    """Identity of an existing file (device, inode), which sees through links and spellings."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _check_output(output: Path, inputs: dict[tuple[int, int], Path]) -> None:
    """Refuse an ``--output`` whose writing would destroy an input or an unrelated file."""
    if output.is_dir():
        raise DataError(f"--output {output} is a folder; give a file such as {output}/pred.jsonl")
    key = _file_key(output)
    if key in inputs:
        raise DataError(f"--output {output} is one of the input images ({inputs[key]})")
    if key is not None and output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise DataError(
            f"--output {output} exists and is not a .jsonl or .json file: not replacing it"
        )


def _annotated_paths(
    files: list[Path], folder: Path, inputs: dict[tuple[int, int], Path]
) -> list[Path]:
    """Where each file's annotated copy goes, refusing any that would replace an input."""
    targets, taken = [], set()
    for path in files:
        # a/x.jpg and b/x.png must not overwrite each other (nor X.jpg on a case-blind disk)
        name, k = path.stem, 1
        while name.lower() in taken:
            k += 1
            name = f"{path.stem}-{k}"
        taken.add(name.lower())
        target = folder / f"{name}.jpg"
        key = _file_key(target)
        if key in inputs:
            raise DataError(
                f"--annotate {folder} would overwrite the input {inputs[key]}; "
                "choose a folder without input images"
            )
        targets.append(target)
    return targets


def predict_files(
    paths: list[str | os.PathLike],
    model: str = "default",
    aligned: bool = False,
    output: str | os.PathLike | None = None,
    annotate_dir: str | os.PathLike | None = None,
    tta: bool | None = None,
    backend: str = "onnx",
    batch_size: int = 64,
    device: str = "auto",
    quiet: bool = False,
    amp: str = "auto",
    precision: str = "auto",
    spin: bool = False,
    detector: str = "yunet",
    workers: int = 0,
    ordered: bool = True,
    resume: bool = False,
) -> int:
    """The ``agegender predict`` command; returns the exit code (0 all read, 1 some failed).

    ``output`` is written to a temporary file beside it and moved into place when the run ends,
    so an interrupted run leaves the previous file whole (and what it found in
    ``OUTPUT.partial``). An ``output`` or annotated image that
    would replace an input image, or an existing ``output`` that is not ``.jsonl``/``.json``,
    is refused with a :class:`~agegender.errors.DataError` before anything is written.

    ``workers``: processes, each with its own model and ``cores / workers`` threads (1: this
    process, decoding in a thread beside the network; 0: :func:`auto_workers`). Results come
    in input order, or as they are done with ``ordered=False``. ``resume``: the images
    already in ``output`` (or in ``OUTPUT.partial``, what an interrupted run left) are kept
    and not predicted again. ``spin``: idle ONNX Runtime threads spin for work; off by
    default, since decoding runs in a thread beside the network and needs a core between the
    network's runs (``benchmarks/spin.py``).
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ConfigError(f"--workers must be 0 (auto) or more, got {workers}")
    if resume and output is None:
        raise ConfigError("--resume needs --output: the results to continue")
    files = find_images(paths)
    inputs = {key: p for p in files if (key := _file_key(p)) is not None}
    out_path = Path(output) if output else None
    if out_path is not None:
        _check_output(out_path, inputs)
    done_lines = _done(out_path) if resume and out_path is not None else {}
    files = [f for f in files if str(f) not in done_lines]
    targets = _annotated_paths(files, Path(annotate_dir), inputs) if annotate_dir else []
    workers = workers or auto_workers(len(files), aligned)
    load = {"model": model, "device": device, "tta": tta, "backend": backend, "amp": amp,
            "detector": None if aligned else detector, "precision": precision,
            "spin": spin}  # fmt: skip
    out_f, tmp = None, None
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = fileio.temp_path(out_path)
        out_f = open(tmp, "w")  # noqa: SIM115 - written batch by batch
        out_f.writelines(done_lines.values())
    if annotate_dir:
        Path(annotate_dir).mkdir(parents=True, exist_ok=True)
    failed = 0
    bar = tqdm(
        total=len(files),
        unit="img",
        desc="predicting",
        file=sys.stderr,
        disable=quiet or len(files) < 2,
        leave=False,
    )
    done = False
    try:
        if workers == 1:
            batches = _pipelined(Predictor.load(**load), files, batch_size, aligned)
        else:
            batches = _in_workers(load, files, batch_size, aligned, workers, ordered)
        for s, chunk, results in batches:
            for i, (path, res) in enumerate(zip(chunk, results)):
                error = None
                faces: list[Face] = []
                if isinstance(res, Exception):
                    error = first_line(res)
                    failed += 1
                else:
                    faces = res
                if out_f:
                    rec = {"path": str(path), "faces": [f.to_dict() for f in faces], "error": error}
                    out_f.write(json.dumps(rec) + "\n")
                else:
                    _print_table(path, faces, error)
                if annotate_dir and error is None:
                    annotate(path, faces).save(targets[s + i], quality=90)
            bar.update(len(chunk))
        done = True
    finally:
        bar.close()
        if out_f:
            out_f.close()
            if done:
                fileio.replace(tmp, out_path)
                # what an interrupted run left is in the output now, or was replaced by it
                out_path.with_name(out_path.name + ".partial").unlink(missing_ok=True)
            elif tmp.stat().st_size:  # the previous results stay whole; the new ones so far too
                partial = out_path.with_name(out_path.name + ".partial")
                os.replace(tmp, partial)
                print(f"agegender predict: the results so far are in {partial} (--resume "
                      "continues from them)", file=sys.stderr)  # fmt: skip
            else:
                tmp.unlink()
    if failed:
        print(
            f"agegender predict: {failed} of {len(files)} images could not be read", file=sys.stderr
        )
    return 1 if failed else 0


def _done(output: Path) -> dict[str, str]:
    """Path -> its JSON line, of the images an earlier run wrote to ``output`` or, when it was
    interrupted, to ``OUTPUT.partial`` (the later of the two); a line cut short is not done."""
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
                done[rec["path"]] = line
    return done


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


def _start_worker(load: dict, threads: int) -> None:
    """A worker process's start: its own model, with ``threads`` threads (OpenCV's too), so
    that workers x threads stays within the cores."""
    global _worker
    import cv2

    cv2.setNumThreads(threads)
    _worker = Predictor.load(**load, threads=threads)


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


def _in_workers(load: dict, files: list[Path], batch_size: int, aligned: bool, workers: int,
                ordered: bool):  # fmt: skip
    """:func:`_pipelined`'s batches from ``workers`` processes: at most two chunks a worker in
    flight (memory stays flat however many files), yielded in input order or as done."""
    import multiprocessing
    from collections import deque
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, default_threads() // workers)
    # spawn, not fork: a forked copy of a process with threads running can deadlock
    ctx = multiprocessing.get_context("spawn")
    chunk = max(1, min(batch_size, -(-len(files) // (4 * workers))))  # every worker gets work
    starts = iter(range(0, len(files), chunk))
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker,
                             initargs=(load, threads)) as pool:  # fmt: skip
        pending: deque = deque()

        def submit() -> bool:
            s = next(starts, None)
            if s is None:
                return False
            part = files[s : s + chunk]
            pending.append((s, part, pool.submit(_work, [str(p) for p in part], aligned)))
            return True

        while len(pending) < 2 * workers and submit():
            pass
        try:
            while pending:
                if ordered:
                    s, part, future = pending.popleft()
                    results = future.result()
                else:
                    wait([f for _, _, f in pending], return_when=FIRST_COMPLETED)
                    k = next(i for i, (_, _, f) in enumerate(pending) if f.done())
                    s, part, future = pending[k]
                    del pending[k]
                    results = future.result()
                submit()
                yield s, part, results
        except BrokenProcessPool:
            raise DataError(
                "a worker process died (out of memory?): the results so far are kept; "
                "rerun with --resume to continue"
            ) from None


def _print_table(path: Path, faces: list[Face], error: str | None) -> None:
    if error:
        print(f"{path}: error: {error}")
        return
    if not faces:
        print(f"{path}: no face found")
        return
    print(f"{path}: {len(faces)} face{'s' if len(faces) > 1 else ''}")
    for i, f in enumerate(faces, 1):
        box = ", ".join(f"{v:.0f}" for v in f.box)
        interval = f" ({f.age_interval[0]:.0f}-{f.age_interval[1]:.0f})" if f.age_interval else ""
        print(
            f"  {i}. {f.gender:6s} p_female {f.p_female:.2f}  age {f.age:4.1f}{interval}"
            f"  box [{box}]  score {f.score:.2f}"
        )
