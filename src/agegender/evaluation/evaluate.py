"""Evaluation of a trained model: metrics, a Markdown report, plots and per-image predictions.

:func:`evaluate` runs a model over a prepared cache split (or a plain image folder) and writes
``metrics.json``, ``report.md``, ``predictions.csv`` and four PNG plots into one folder;
:func:`show` draws a grid of faces titled with true and predicted labels. The model runs as
:class:`~agegender.inference.options.InferenceOptions` say, through
:func:`agegender.training.loading.open_predictor`: by default its ONNX file on ONNX Runtime,
what users run. The numbers come from :func:`agegender.evaluation.metrics.compute_metrics`, a
pure function of the labels and predictions.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.figure import Figure

from agegender.core import fileio
from agegender.core.config import load_config
from agegender.core.errors import DataError
from agegender.core.progress import progress_bar
from agegender.data.cache import is_cache, open_cache, unfinished_cache
from agegender.data.manifest import read_manifest
from agegender.data.prepare import prepare
from agegender.data.utkface import SPLITS
from agegender.evaluation import report
from agegender.evaluation.metrics import compute_metrics
from agegender.inference.model_files import read_seen, resolve_checkpoint
from agegender.inference.options import InferenceOptions
from agegender.inference.predictor import Predictor, as_options
from agegender.inference.runtime import cpu_info, default_threads
from agegender.training.loading import open_predictor
from agegender.vision.images import preprocess_batch

GOOD_AGE_ERROR = 5  # show(): a face counts as right within this many years
#: most single-image calls ``--timing-reps`` may ask for: the median settles long before, and
#: more only keeps the machine busy (10,000 at 2 ms is 20 s)
MAX_TIMING_REPS = 10_000
SPLIT_CHOICES = (*SPLITS, "all")

#: what :func:`evaluate` and :func:`compare` take: ``options`` or a model's name or path
Options = InferenceOptions | str | os.PathLike
#: ``faces (B, H, W, C) uint8 -> outputs``: the model as it runs, flip TTA decided
Run = Callable[[np.ndarray], dict[str, np.ndarray]]


# --------------------------------------------------------------------------- model and data

#: the notes already printed by this :func:`compare` (both of its evaluations leave out the
#: same images and skip the same files); None outside one: every note is printed
_SAID: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("said", default=None)


def _note(line: str) -> None:
    """Print ``line`` to stderr, once per :func:`compare`."""
    said = _SAID.get()
    if said is not None:
        if line in said:
            return
        said.add(line)
    print(line, file=sys.stderr)


class _Loaded(NamedTuple):
    images: np.ndarray  # (N, H, W, C) uint8 at the model's input size
    ages: np.ndarray  # (N,) whole years, or (N, 2) (low, high) where the labels have ranges
    genders: np.ndarray  # -1: not known
    races: np.ndarray  # -1: not known
    paths: list[str]
    split: str  # "all" for a plain image folder
    source: str  # where the images came from, for people
    skipped: dict[str, Any] | None = None  # a plain folder's files left out, see _skipped
    excluded: int | None = None  # images left out as seen in training (None: no record)
    groups: dict[str, np.ndarray] | None = None  # the labels' group columns


def _checkpoint(model: str | os.PathLike) -> Path:
    """The file a model's name or path means (an ``.onnx`` file as given): what the report
    names, and whose record of training images is read."""
    path = Path(model)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise DataError(f"no such model: {model}")
        return path
    return resolve_checkpoint(model)


def _seen_record(path: Path) -> Any:
    """A checkpoint's record of its training images; an ONNX file keeps none."""
    return None if path.suffix == ".onnx" else read_seen(path)


def _run_cache(model_spec: str | os.PathLike) -> Path:
    """The cache a run folder trained on, as its ``config.toml`` records it."""
    run = Path(model_spec)
    if str(model_spec) == "default" or not (run / "config.toml").is_file():
        raise DataError(
            f"give --data (a prepared cache or an image folder): {model_spec} is not a run "
            "folder with a config.toml naming its data"
        )
    d = load_config(run / "config.toml").data
    if d.cache:
        cache = Path(d.cache)
    elif d.root:
        cache = run / "cache"  # where train() prepares data.root when data.cache is empty
    else:
        raise DataError(f"{run}/config.toml names no data.cache or data.root; give --data")
    if not cache.exists():
        raise DataError(
            f"{run}/config.toml names the cache {cache}, which does not exist; give --data"
        )
    return cache


def _data_root(model: str | os.PathLike, data: str | os.PathLike | None, split: str) -> Path:
    """Where the images come from, checked before any model is opened (or exported)."""
    if split not in SPLIT_CHOICES:
        raise DataError(f"split must be one of {', '.join(SPLIT_CHOICES)}, got {split!r}")
    if data is not None and not Path(data).exists():
        raise DataError(
            f"no such data: {data} (give a prepared cache, an image folder or a labels file)"
        )
    return _run_cache(model) if data is None else Path(data)


def _skipped(cache_dir: Path) -> dict[str, Any] | None:
    """The files of a plain image folder that :func:`prepare` left out: how many, of how many,
    by reason, and the first few with their reasons (bad files before duplicates)."""
    rows = read_manifest(cache_dir)
    left_out = sorted(
        (r for r in rows if r["status"] != "kept"),
        key=lambda r: r["status"].startswith("duplicate"),
    )
    if not left_out:
        return None
    return {
        "n": len(left_out),
        "of": len(rows),
        "by_reason": dict(Counter(r["status"].split(":")[0] for r in left_out).most_common()),
        "examples": [f"{Path(r['path']).name} ({r['status']})" for r in left_out[:3]],
    }


def _skipped_line(skipped: dict[str, Any], root: Path) -> str:
    why = ", ".join(f"{n:,} {reason}" for reason, n in skipped["by_reason"].items())
    names = ", ".join(e.split(" (", 1)[0] for e in skipped["examples"])
    more = ", ..." if skipped["n"] > len(skipped["examples"]) else ""
    return (
        f"skipped {skipped['n']:,} of {skipped['of']:,} image files in {root} ({why}): "
        f"{names}{more}"
    )


def _unseen(
    checkpoints: list[Path], cache: Any, rows: np.ndarray, where: str
) -> tuple[np.ndarray, int | None]:
    """``rows`` without the images any of the checkpoints was trained or validated on, or
    near-copies of them (by their records), and how many were left out (None: the first
    keeps no record)."""
    records = [_seen_record(c) for c in checkpoints]
    if records[0] is None:
        print(
            f"agegender: {checkpoints[0].name} keeps no record of its training images: nothing "
            "was left out, and the scores may include images it trained on",
            file=sys.stderr,
        )
        return rows, None
    hashes, faces = [cache.content_hash[i] for i in rows], cache.images[rows]
    seen = np.zeros(len(rows), bool)
    for record in records:
        if record is not None:
            seen |= record.seen(hashes, faces)
    if seen.all():
        raise DataError(f"every image of {where} was seen in training (or is a near-copy)")
    if seen.any():
        _note(
            f"agegender: left out {int(seen.sum()):,} of {len(rows):,} images that the "
            f"model{'s' if len(records) > 1 else ''} trained or validated on, or near-copies "
            "of them"
        )
    return rows[~seen], int(seen.sum())


def _open_data(
    root: Path, split: str, data_config: dict[str, Any], work_dir: Path
) -> tuple[Any, np.ndarray, str, str, dict[str, Any] | None]:
    """``(cache, rows, split, source, skipped)``: a prepared cache's ``split``, or a plain
    folder or labels file prepared into ``work_dir`` at the model's size and colour and used
    whole (its split would be an arbitrary one of ours, not the model's)."""
    if is_cache(root) or unfinished_cache(root):  # open_cache says what is wrong with the latter
        cache = open_cache(root)
        rows = cache.indices(None if split == "all" else split)
        source = f"{root} ({'all images' if split == 'all' else f'{split} split'})"
        return cache, rows, split, source, None
    if root.is_file():  # a labels file: its photos detected and aligned, as prepare does
        prepare([], work_dir / "cache", data_config, quiet=True, labels=[root])
    else:
        prepare([root], work_dir / "cache", data_config, quiet=True)
    cache = open_cache(work_dir / "cache")
    skipped = _skipped(work_dir / "cache")
    if skipped:  # said here, since the folder's manifest goes with the temporary cache
        _note(f"agegender: {_skipped_line(skipped, root)}")
    return cache, cache.indices(None), "all", f"{root} (all usable images)", skipped


def _load(
    meta: dict[str, Any],
    root: Path,
    split: str,
    work_dir: Path,
    unseen_by: Sequence[Path] = (),
) -> _Loaded:
    """The labelled images to run a model (of metadata ``meta``) on, at its size.

    A prepared cache gives its ``split`` (``all`` for every row); a plain image folder or a
    labels file (CSV or JSON lines, see :mod:`agegender.data.labels`) is used whole. The
    images the models of ``unseen_by`` (checkpoints; the first is the one evaluated) trained or
    validated on are left out, near-copies included (see
    :class:`agegender.data.near_dups.SeenRecord`).
    """
    data_config = meta["data_config"]
    cache, rows, split, source, skipped = _open_data(root, split, data_config, work_dir)
    where = f"the {split} split of {root}" if split != "all" else str(root)
    if len(rows) == 0:
        raise DataError(f"{where} holds no usable images")
    excluded = None
    if unseen_by:
        rows, excluded = _unseen(list(unseen_by), cache, rows, where)
    color = data_config["color"]
    if cache.color != color:
        raise DataError(
            f"the model expects {color} images but {root} holds {cache.color} ones: prepare a "
            f"{color} cache (agegender prepare ... --color {color})"
        )
    # fancy indexing reads those rows into memory; a cache of another size goes through the
    # one resize that training and prediction use
    images = preprocess_batch(np.asarray(cache.images[rows]), data_config)
    return _Loaded(
        images,
        _ages(cache, rows),
        cache.gender[rows],
        cache.race[rows],
        [cache.paths[i] for i in rows],
        split,
        source,
        skipped,
        excluded,
        _groups(cache, rows),
    )


def _ages(cache: Any, rows: np.ndarray) -> np.ndarray:
    """Whole years, or ``(N, 2)`` ranges where the cache has any."""
    if not cache.has_ranges:
        return cache.age[rows]
    return np.stack([cache.age_low[rows], cache.age_high[rows]], axis=1)


def _groups(cache: Any, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The labels' group columns, and the origin of each image where there are several."""
    out = {g: v[rows] for g, v in cache.groups.items()}
    origins = np.array(cache.origin)[rows] if cache.origin else np.array([])
    if len(set(origins.tolist())) > 1:
        out["origin"] = origins
    return out


def _predictor(options: InferenceOptions) -> Predictor:
    """The model as ``options`` run it, without a face detector (the cache's faces are
    aligned already)."""
    return open_predictor(options.replace(detector=None))


def _run(predictor: Predictor) -> Run:
    """The predictor's network on faces already at its size, with its flip TTA: the batch
    path, no detection or decoding."""

    def run(faces: np.ndarray) -> dict[str, np.ndarray]:
        return predictor.backend(faces, predictor.tta)

    return run


def _runtime(predictor: Predictor) -> dict[str, Any]:
    """What ran the model, for the report: runtime, device, bf16 and threads."""
    backend = predictor.backend
    if predictor.options.backend == "torch":
        import torch

        from agegender.training.torch_backend import device_name

        return {
            "runtime": "torch",
            "device": device_name(backend.device),
            "amp": bool(backend.amp),
            "threads": torch.get_num_threads(),
        }
    return {
        "runtime": f"ONNX Runtime {backend.path.name}",
        "device": cpu_info()["name"],
        "amp": False,
        "threads": predictor.options.threads or default_threads(),
    }


# --------------------------------------------------------------------------- timing


def predict_all(
    run: Run, images: np.ndarray, batch_size: int, progress: bool
) -> dict[str, np.ndarray]:
    """``run`` over ``images`` in batches, the outputs concatenated."""
    parts: dict[str, list[np.ndarray]] = {}
    starts = range(0, len(images), batch_size)
    for s in progress_bar(starts, quiet=not progress, desc="predicting", unit="batch"):
        for k, v in run(images[s : s + batch_size]).items():
            parts.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in parts.items()}


def time_inference(run, images: np.ndarray, batch_size: int = 256, reps: int = 50) -> dict:
    """Median inference time per image at batch size 1 and at ``batch_size``, in ms.

    Batch 1 is the median of ``reps`` single-image calls after a warm-up; the batch figure is
    the median over ``max(1, min(5, reps // 10))`` full batches (images repeated to fill one).
    Times are for the whole call of ``run`` (normalisation, TTA, copy back), which is what a
    user of the model waits for.
    """

    def timed(x: np.ndarray) -> float:
        t0 = time.perf_counter()
        run(x)
        return time.perf_counter() - t0

    one = images[:1]
    for _ in range(min(5, reps)):
        timed(one)
    single = [timed(one) for _ in range(reps)]
    batch = images[np.arange(batch_size) % len(images)]
    batches = max(1, min(5, reps // 10))
    timed(batch)
    many = [timed(batch) / batch_size for _ in range(batches)]
    return {
        "batch1_ms_per_image": 1000 * statistics.median(single),
        "batch1_calls": reps,
        "batch_size": batch_size,
        "batch_ms_per_image": 1000 * statistics.median(many),
        "batch_calls": batches,
    }


# --------------------------------------------------------------------------- commands


def _check_request(batch_size: int, timing: bool, timing_reps: int, out: Path) -> None:
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    if timing and timing_reps < 1:
        raise DataError(f"timing reps must be >= 1, got {timing_reps}")
    if timing and timing_reps > MAX_TIMING_REPS:
        raise DataError(f"timing reps must be at most {MAX_TIMING_REPS:,}, got {timing_reps:,}")
    if (out / "best.safetensors").is_file() or (out / "last.state.pt").is_file():
        # its metrics.json is the training's, which sweeps and reports read
        raise DataError(
            f"--out {out} is a training run folder: write the evaluation elsewhere, "
            f"e.g. --out {out / 'eval'}"
        )


def _describe(
    m: dict[str, Any], predictor: Predictor, checkpoint: Path, d: _Loaded, ran: dict[str, Any]
) -> None:
    """Add to the metrics ``m`` what was evaluated, on what, and how."""
    m.update(
        model=predictor.meta["model"]["name"],
        checkpoint=str(checkpoint),
        epoch=predictor.meta.get("epoch"),
        data=d.source,
        split=d.split,
        skipped=d.skipped,
        excluded_seen_in_training=d.excluded,
        tta=predictor.tta,
        amp=ran["amp"],
        device=ran["device"],
        runtime=ran["runtime"],
    )


def _write_report(out: Path, m: dict[str, Any], d: _Loaded, pred: dict[str, np.ndarray]) -> None:
    """Write the report's files into a temporary folder beside ``out``, then move them in:
    a failure (a full disk) leaves ``out`` as it was, not half a report."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
        os.chmod(tmp, 0o777 & ~fileio._UMASK)  # mkdtemp's 0700 would become the folder's
    except OSError as e:
        _disk_full(e, out)
        raise
    try:
        report.write_predictions(tmp / "predictions.csv", d, pred)
        report.plots(m, d.ages, pred["age"], tmp)
        fileio.write_text(tmp / "report.md", report.render(m))
        fileio.write_json(tmp / "metrics.json", m)
        _move_in(tmp, out)
    except OSError as e:
        _disk_full(e, out)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_in(tmp: Path, out: Path) -> None:
    """The files of ``tmp`` into ``out``: the folder itself when ``out`` is new, else each
    file over its old self (renames, which a full disk does not stop)."""
    if not out.exists():
        with contextlib.suppress(OSError):  # made meanwhile: filled file by file below
            tmp.rename(out)
            return
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)


def _disk_full(error: OSError, out: Path) -> None:
    if fileio.is_disk_full(error):
        raise DataError(f"--out {out}: no space left on the device; nothing written") from error


def evaluate(
    options: Options = "default",
    data: str | os.PathLike | None = None,
    split: str = "test",
    out_dir: str | os.PathLike = "runs/evaluate",
    batch_size: int = 256,
    timing: bool = True,
    timing_reps: int = 50,
    quiet: bool = False,
    exclude_seen: bool = True,
    also_unseen_by: Sequence[str | os.PathLike] = (),
) -> dict[str, Any]:
    """Evaluate a model and write ``metrics.json``, ``report.md``, ``predictions.csv``,
    ``confusion.png``, ``age_scatter.png``, ``mae_by_band.png`` and ``reliability.png``.

    Args:
        options: the model (``default``, ``accurate``, a run folder, a checkpoint, an
            ``.onnx`` file) and how it runs, or a model with the default options: its ONNX
            file on ONNX Runtime, as ``predict`` and ``serve`` run it (``backend="torch"``:
            the checkpoint on ``device`` with ``amp``); ``tta=None`` follows its recipe.
        data: a prepared cache or a plain UTKFace-style image folder (prepared on the fly at
            the model's size and colour, all of it used); ``None`` uses a run folder's own cache.
        split: ``train``, ``val``, ``test`` or ``all`` (caches only).
        out_dir: where the files go (created).
        batch_size: images per forward pass (and the batch size timed).
        timing: also time inference at batch size 1 and ``batch_size``.
        timing_reps: single-image calls timed (see :func:`time_inference`), at most
            :data:`MAX_TIMING_REPS`.
        quiet: no progress bar.
        exclude_seen: leave out every image the model trained or validated on, and
            near-copies of them, by the record its checkpoint keeps (says how many, and
            ``metrics.json`` keeps the count as ``excluded_seen_in_training``).
        also_unseen_by: other models whose training images are left out too (see
            :func:`compare`).

    Returns the metrics, as written to ``metrics.json``.
    """
    opts = as_options(options, {})
    out = Path(out_dir)
    _check_request(batch_size, timing, timing_reps, out)
    checkpoint = _checkpoint(opts.model)
    root = _data_root(opts.model, data, split)
    others = [_checkpoint(m) for m in also_unseen_by]
    predictor = _predictor(opts)
    with tempfile.TemporaryDirectory(prefix="agegender-eval-") as tmp:
        unseen_by = [checkpoint, *others] if exclude_seen else []
        d = _load(predictor.meta, root, split, Path(tmp), unseen_by)
    run = _run(predictor)
    pred = predict_all(run, d.images, batch_size, progress=not quiet)
    m = compute_metrics(
        d.ages, d.genders, d.races, pred["age"], pred["p_female"], pred.get("age_std"), d.groups
    )
    ran = _runtime(predictor)
    _describe(m, predictor, checkpoint, d, ran)
    if timing:
        m["timing"] = time_inference(run, d.images, batch_size, timing_reps)
        m["timing"].update(device=m["device"], threads=ran["threads"], tta=m["tta"], amp=m["amp"])
    _write_report(out, m, d, pred)
    return m


def _diff_row(name: str, a: float, b: float, percent: bool = False) -> list[str]:
    spec, scale = (".2%", 100) if percent else (".3f", 1)
    return [name, format(a, spec), format(b, spec), f"{(b - a) * scale:+.2f}"]


def compare(
    options: Options,
    other_model: str | os.PathLike,
    out_dir: str | os.PathLike = "runs/evaluate",
    data: str | os.PathLike | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """Evaluate two models on the same images, those neither trained nor validated on (by both
    records): each gets its report in ``out_dir/a`` and ``out_dir/b``, the differences go to
    ``compare.json`` and ``compare.md`` (``b`` minus ``a``). ``other_model`` runs with the
    same ``options`` as the first model; ``kw`` as :func:`evaluate` takes (``also_unseen_by``
    aside)."""
    out = Path(out_dir)
    opts = as_options(options, {})
    model, other = opts.model, os.fspath(other_model)
    said = _SAID.set(set())  # a note the first evaluation printed is not printed again
    try:
        a = evaluate(opts, data, out_dir=out / "a", also_unseen_by=[other], **kw)
        b = evaluate(
            opts.replace(model=other), data, out_dir=out / "b", also_unseen_by=[model], **kw
        )
    finally:
        _SAID.reset(said)
    rows = [
        _diff_row("gender accuracy", a["gender_accuracy"], b["gender_accuracy"], percent=True),
        _diff_row("age MAE (years)", a["age_mae"], b["age_mae"]),
    ]
    for kind in ("race", "age"):
        for key, what in (("gender_accuracy", "gender accuracy"), ("age_mae", "age MAE")):
            wa, wb = a["worst_groups"][kind][key], b["worst_groups"][kind][key]
            if wa and wb:
                name = f"{what}, worst {kind} (a: {wa['group']}, b: {wb['group']})"
                rows.append(_diff_row(name, wa["value"], wb["value"], key == "gender_accuracy"))
    result = {
        "a": {"model": str(model), **{k: a[k] for k in ("gender_accuracy", "age_mae", "n")}},
        "b": {"model": str(other), **{k: b[k] for k in ("gender_accuracy", "age_mae", "n")}},
        "rows": rows,
    }
    lines = [
        "# Comparison",
        "",
        f"a = `{model}`, b = `{other}`, on the same {a['n']:,} images of {a['data']}: those "
        "neither model trained or validated on. Differences are b - a (accuracy in points).",
        *report.table(["metric", "a", "b", "b - a"], rows),
        "Each model's report: [a/report.md](a/report.md), [b/report.md](b/report.md).",
        "",
    ]
    fileio.write_json(out / "compare.json", result)
    fileio.write_text(out / "compare.md", "\n".join(lines))
    return result


def format_summary(metrics: dict[str, Any], out_dir: str | os.PathLike) -> str:
    """A few lines for people: accuracy, MAE, per-gender accuracy and where the report is."""
    m = metrics
    g = m["gender_accuracy_by_gender"]
    lines = [
        f"{m['n']:,} images from {m['data']} ({'flip TTA' if m['tta'] else 'no TTA'})",
        f"gender accuracy  {m['gender_accuracy']:.2%}  (male {report.fmt(g['male'], '.2%')}, "
        f"female {report.fmt(g['female'], '.2%')})",
        f"age MAE          {m['age_mae']:.2f} years  (std of errors {m['age_abs_error_std']:.2f})",
    ]
    for kind in ("race", "age"):
        w_acc, w_mae = (m["worst_groups"][kind][k] for k in ("gender_accuracy", "age_mae"))
        if w_acc and w_mae:
            lines.append(
                f"worst {kind:4s}       {w_acc['group']}: {w_acc['value']:.2%} "
                f"({100 * w_acc['gap']:+.1f} points); {w_mae['group']}: MAE "
                f"{w_mae['value']:.2f} ({w_mae['gap']:+.2f})"
            )
    if "timing" in m:
        t = m["timing"]
        lines.append(
            f"speed            {t['batch1_ms_per_image']:.2f} ms/image at batch 1, "
            f"{t['batch_ms_per_image']:.3f} at batch {t['batch_size']} "
            f"({t['device']})"
        )
    lines.append(f"report           {Path(out_dir) / 'report.md'}")
    return "\n".join(lines)


def _figure_path(out: str | os.PathLike) -> Path:
    """Where :func:`show` writes for ``--out``: a folder gets ``grid.png`` inside it, a name
    without an extension gets ``.png`` (as matplotlib would add, but then said)."""
    path = Path(out)
    if path.is_dir() or str(out).endswith(("/", os.sep)):
        return path / "grid.png"
    if not path.suffix:
        return path.with_name(path.name + ".png")
    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise DataError(
            f"--out {out}: matplotlib cannot write {path.suffix} files; give a file ending in "
            f"one of {', '.join('.' + f for f in sorted(formats))}"
        )
    return path


def show(
    options: Options,
    data: str | os.PathLike | None,
    out: str | os.PathLike,
    n: int = 25,
    split: str = "test",
    seed: int = 0,
) -> Path:
    """Draw ``n`` random faces (5 per row) titled ``true 34 F / pred 31 F``; returns the file
    written: ``out``, ``out/grid.png`` for a folder, or ``out.png`` when it has no extension.

    The model runs as ``options`` say (see :func:`evaluate`). A title is green when the
    predicted gender is right and the age is off by at most :data:`GOOD_AGE_ERROR` years, red
    otherwise. ``data`` is resolved as in :func:`evaluate`.
    """
    if n < 1:
        raise DataError(f"n must be >= 1, got {n}")
    path = _figure_path(out)  # before the model and the data are loaded
    opts = as_options(options, {})
    checkpoint = _checkpoint(opts.model)
    root = _data_root(opts.model, data, split)
    predictor = _predictor(opts)
    with tempfile.TemporaryDirectory(prefix="agegender-show-") as tmp:
        d = _load(predictor.meta, root, split, Path(tmp), [checkpoint])
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(d.ages), size=min(n, len(d.ages)), replace=False))
    pred = _run(predictor)(d.images[picks])
    fig = _grid(d, picks, pred)
    fig.suptitle(f"{predictor.meta['model']['name']} on {d.source}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    with fileio.atomic_path(path, path.suffix) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return path


def _grid(d: _Loaded, picks: np.ndarray, pred: dict[str, np.ndarray], cols: int = 5) -> Figure:
    """The faces ``picks`` of ``d``, ``cols`` a row, each titled with its truth and ``pred``."""
    rows = math.ceil(len(picks) / cols)
    fig = Figure(figsize=(10, 2.2 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for k, (ax, i) in enumerate(zip(axes, picks)):
        img = d.images[i]
        if img.shape[2] == 1:
            ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(img)
        age, sex = float(pred["age"][k]), int(pred["p_female"][k] > 0.5)
        low, high = (d.ages[i][0], d.ages[i][1]) if d.ages.ndim == 2 else (d.ages[i], d.ages[i])
        off = max(low - age, age - high, 0)
        good = sex == d.genders[i] and off <= GOOD_AGE_ERROR
        truth = f"{low}" if low == high else f"{low}-{high}"
        g = "MF?"[d.genders[i]]  # -1: not known
        ax.set_title(
            f"true {truth} {g} / pred {round(age)} {'MF'[sex]}",
            fontsize=8.5,
            color="tab:green" if good else "tab:red",
        )
    return fig
