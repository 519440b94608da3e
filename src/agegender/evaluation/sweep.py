"""Grids of training runs: a base recipe plus a list of overrides, evaluated on one test split.

A sweep file (see ``sweeps/``)::

    title = "Optimizer"
    base = "../configs/seed.toml"          # relative to the sweep file
    overrides = ["train.epochs=30"]         # applied to every run (optional)
    columns = ["test_acc", "test_mae"]     # metrics to tabulate (optional)

    [[run]]
    name = "sgd"
    overrides = ["train.optimizer=sgd"]
    study = { acc = 82.3, mae = 7.8 }       # the study's claim, shown beside ours (optional)

Override values may use ``{data}`` (the ``--data`` cache) and ``{root}`` (the ``--root`` image
folders). Each run trains into ``OUT/<name>`` with ``python -m agegender train``, so runs can go
``--parallel`` in separate processes; the test metrics come from each run's ``metrics.json``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agegender.core import fileio
from agegender.core.config import Config, check_config, load_config, read_toml, to_dict
from agegender.core.errors import ConfigError, DataError
from agegender.data.cache import is_cache, open_cache
from agegender.training.models import list_models
from agegender.training.runs import is_run_name

DEFAULT_COLUMNS = (
    "test_acc",
    "test_mae",
    "train_acc",
    "val_acc",
    "train_mae",
    "val_mae",
    "seconds_per_epoch",
    "epochs_run",
)


@dataclass(frozen=True)
class SweepRun:
    name: str
    overrides: tuple[str, ...]
    study: dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Sweep:
    title: str
    base: Path
    overrides: tuple[str, ...]
    runs: tuple[SweepRun, ...]
    columns: tuple[str, ...] = DEFAULT_COLUMNS
    description: str = ""


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read and check a sweep file: every run's recipe must resolve (bad keys fail here, early)."""
    p = Path(path)
    table = read_toml(p, "sweep file")
    known = {"title", "base", "overrides", "run", "columns", "description"}
    if set(table) - known:
        raise ConfigError(
            f"{path}: unknown keys {sorted(set(table) - known)}; valid: {sorted(known)}"
        )
    if "base" not in table or not table.get("run"):
        raise ConfigError(f"{path}: a sweep needs base = RECIPE and at least one [[run]]")
    runs = []
    for r in table["run"]:
        if (
            not isinstance(r, dict)
            or set(r) - {"name", "overrides", "study", "note"}
            or "name" not in r
        ):
            raise ConfigError(f"{path}: each [[run]] takes name, overrides, study, note; got {r}")
        _check_run(path, r)
        runs.append(
            SweepRun(
                r["name"],
                tuple(r.get("overrides", [])),
                dict(r.get("study", {})),
                r.get("note", ""),
            )
        )
    if len({r.name for r in runs}) != len(runs):
        raise ConfigError(f"{path}: run names must be unique")
    sweep = Sweep(
        title=table.get("title", p.stem),
        base=(p.parent / table["base"]).resolve(),
        overrides=tuple(table.get("overrides", [])),
        runs=tuple(runs),
        columns=tuple(table.get("columns", DEFAULT_COLUMNS)),
        description=table.get("description", ""),
    )
    for run in sweep.runs:  # fail before hours of training, not in the middle
        load_config(sweep.base, _overrides(sweep, run, "/data", "/root", Path("/out"), {}))
    return sweep


def _check_run(path: str | os.PathLike, r: dict[str, Any]) -> None:
    name, overrides = r["name"], r.get("overrides", [])
    if not is_run_name(name):
        raise ConfigError(
            f"{path}: run name {name!r} must be a plain name (letters, digits, _ . + -): it "
            "names the run's folder"
        )
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{path}: run {name}: overrides must be a list of key=value strings")
    study = r.get("study", {})
    if not isinstance(study, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in study.values()
    ):
        raise ConfigError(f"{path}: run {name}: study must be a table of numbers")
    if not isinstance(r.get("note", ""), str):
        raise ConfigError(f"{path}: run {name}: note must be text")


def _overrides(
    sweep: Sweep, run: SweepRun, data: str, root: str, out: Path, extra: dict[str, Any]
) -> list[str]:
    items = [*sweep.overrides, *run.overrides]
    if not any(o.startswith("data.root=") for o in items):
        items.insert(0, f"data.cache={data}")
    items = [o.replace("{data}", data).replace("{root}", root) for o in items]
    items += [f"{k}={v}" for k, v in extra.items()]
    items.append(f'run.out="{out / run.name}"')
    return items


def run_sweep(
    path: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    root: str = "",
    limit: int | None = None,
    epochs: int | None = None,
    parallel: int = 1,
    extra: list[str] | None = None,
    only: list[str] | None = None,
    quiet: bool = False,
) -> Path:
    """Train every run of the sweep (``parallel`` at a time), then write ``results.csv`` and
    ``results.md`` in ``out``; returns the Markdown table's path. Finished runs (with a
    ``metrics.json``) are not trained again, so an interrupted sweep resumes."""
    sweep = load_sweep(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    forced = _forced(sweep, data, limit, epochs, parallel, extra or [])
    runs = _selected(sweep, only)
    # Every run's recipe, as it will train, checked before hours of training
    configs = {r.name: load_config(sweep.base, _overrides(sweep, r, str(data), root, out, forced))
               for r in runs}  # fmt: skip
    for name, cfg in configs.items():
        check_config(cfg, list_models())
        if not cfg.data.root and not is_cache(cfg.data.cache):
            raise DataError(f"{cfg.data.cache} is not a prepared cache (run: {name})")
    _check_earlier_runs(out, configs)
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    log(f"{sweep.title}: {len(runs)} runs, {parallel} at a time -> {out}")
    failures = []
    with ThreadPoolExecutor(max(parallel, 1)) as pool:
        trained = pool.map(lambda r: _train_one(sweep, r, str(data), root, out, forced), runs)
        for run, seconds, err in trained:
            status = f"FAILED ({err})" if err else (f"{seconds:.0f}s" if seconds else "cached")
            log(f"  {run.name:24s} {status}")
            if err:
                failures.append(run.name)
    table = write_results(sweep, runs, out, forced)
    log(f"results: {table}")
    if failures:
        raise ConfigError(f"{len(failures)} run(s) failed: {', '.join(failures)} (logs in {out})")
    return table


def _forced(
    sweep: Sweep,
    data: str | os.PathLike,
    limit: int | None,
    epochs: int | None,
    parallel: int,
    extra: list[str],
) -> dict[str, Any]:
    """The settings every run of the sweep trains with, whatever its recipe says."""
    forced: dict[str, Any] = {}
    if limit:
        forced["data.limit"] = limit
    if epochs:
        forced["train.epochs"] = epochs
    forced["train.threads"] = max(1, (os.cpu_count() or 1) // max(parallel, 1))
    for item in extra:
        key, _, value = item.partition("=")
        forced[key] = value
    # A run that prepares its own cache from --root (another colour or size) has to split as
    # the --data cache was split, or it is tested on other images than the rest of the table
    seed = _split_seed(data)
    own = [o for r in sweep.runs for o in (*sweep.overrides, *r.overrides)]
    if (
        seed is not None
        and any(o.startswith("data.root=") for o in own)
        and not any(o.startswith("data.split_seed=") for o in own)
    ):
        forced.setdefault("data.split_seed", seed)
    return forced


def _selected(sweep: Sweep, only: list[str] | None) -> list[SweepRun]:
    """The runs ``--only`` names (all without it); an unknown name is an error."""
    names = [r.name for r in sweep.runs]
    if set(only or []) - set(names):
        raise ConfigError(
            f"--only {' '.join(sorted(set(only or []) - set(names)))}: no such run; "
            f"the sweep's runs: {', '.join(names)}"
        )
    return [r for r in sweep.runs if not only or r.name in only]


def _train_one(
    sweep: Sweep, run: SweepRun, data: str, root: str, out: Path, forced: dict[str, Any]
) -> tuple[SweepRun, float, str]:
    """Train ``run`` in its own process, its output in ``out/NAME.log``: ``(run, seconds,
    error)``; a finished run is skipped (0 seconds), a killed one continued."""
    folder = out / run.name
    if (folder / "metrics.json").is_file():
        return run, 0.0, ""
    if (folder / "last.state.pt").is_file():  # killed in the middle: continue it
        how = ["--resume", str(folder)]
    else:
        how = [str(sweep.base), *_overrides(sweep, run, data, root, out, forced)]
    argv = [sys.executable, "-m", "agegender", "train", "--quiet", *how]
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    with (out / f"{run.name}.log").open("w") as logf:
        proc = subprocess.run(argv, stdout=logf, stderr=subprocess.STDOUT)
    err = "" if proc.returncode == 0 else f"exit {proc.returncode}, see {run.name}.log"
    return run, time.perf_counter() - t0, err


def _split_seed(data: str | os.PathLike) -> int | None:
    """The split seed the ``--data`` cache was prepared with (None: not a cache)."""
    return open_cache(data).summary.get("seed") if is_cache(data) else None


_NOT_RECIPE = ("train.threads", "run.out")


def _check_earlier_runs(out: Path, configs: dict[str, Config]) -> None:
    """Runs already in ``out`` are reused or continued only if they trained what the sweep now
    asks for; otherwise stop before training anything, and touch none of them."""
    stale = []
    for name, cfg in configs.items():
        saved = out / name / "config.toml"
        if not saved.is_file():
            continue
        old, new = _flat(load_config(saved)), _flat(cfg)
        for flat in (old, new):  # the same cache, named from another folder, is the same
            flat["data.cache"] = str(Path(flat["data.cache"]).resolve())
        # the thread count follows --parallel and the machine; run.out is where we looked
        changed = [k for k in new if k not in _NOT_RECIPE and old.get(k) != new[k]]
        if changed:
            diff = ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in changed[:3])
            stale.append(f"{name} ({diff}{', ...' if len(changed) > 3 else ''})")
    if stale:
        raise ConfigError(
            f"{out} holds runs trained with other settings: {'; '.join(stale)}. Give another "
            "--out, or delete those run folders to train them again"
        )


def _flat(cfg: Config) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, section in to_dict(cfg).items() for k, v in section.items()}


def _fmt(key: str, value: Any) -> str:
    if value is None or value == "":
        return "-"
    if key.endswith("_acc"):
        return f"{100 * value:.1f}"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


#: the results table's column titles
COLUMN_TITLES = {
    "test_acc": "gender acc %",
    "test_mae": "age MAE",
    "train_acc": "train acc %",
    "val_acc": "val acc %",
    "train_mae": "train MAE",
    "val_mae": "val MAE",
    "seconds_per_epoch": "s/epoch",
    "epochs_run": "epochs",
    "peak_memory_mb": "peak MB",
    "train_img_per_s": "img/s",
    "study_acc": "study acc %",
    "study_mae": "study MAE",
}


def write_results(
    sweep: Sweep, runs: list[SweepRun] | tuple[SweepRun, ...], out: Path, forced: dict[str, Any]
) -> Path:
    """Collect each run's ``metrics.json`` into ``results.csv`` and a Markdown table."""
    rows = []
    for run in runs:
        f = out / run.name / "metrics.json"
        m = json.loads(f.read_text()) if f.is_file() else {}
        rows.append(
            {
                "run": run.name,
                "overrides": " ".join(run.overrides),
                **{f"study_{k}": v for k, v in run.study.items()},
                **{c: m.get(c) for c in sweep.columns},
                "device": m.get("device", ""),
            }
        )
    study_keys = sorted({k for r in rows for k in r if k.startswith("study_")})
    header = ["run", "overrides", *study_keys, *sweep.columns, "device"]
    with fileio.atomic_write(out / "results.csv", newline="") as fh:
        w = csv.DictWriter(fh, header)
        w.writeheader()
        w.writerows(rows)
    lines = _markdown(sweep, rows, study_keys, forced)
    path = out / "results.md"
    fileio.write_text(path, "\n".join(lines) + "\n")
    return path


def _markdown(
    sweep: Sweep, rows: list[dict[str, Any]], study_keys: list[str], forced: dict[str, Any]
) -> list[str]:
    """``results.md``'s lines: title, what every run was forced to, one row a run."""
    cols = ["run", "overrides", *study_keys, *sweep.columns]
    reduced = ", ".join(f"{k}={v}" for k, v in forced.items())
    lines = [f"### {sweep.title}", ""]
    if sweep.description:
        lines += [sweep.description, ""]
    lines += [
        f"Base recipe `{sweep.base.name}`; forced for every run: `{reduced}`; "
        f"device: {rows[0]['device'] if rows else '-'}. Accuracy and MAE on the test split.",
        "",
        "| " + " | ".join(COLUMN_TITLES.get(c, c) for c in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = [r["run"], f"`{r['overrides']}`" if r["overrides"] else "(base)"]
        cells += [
            _fmt(c, r.get(c))
            if not c.startswith("study_")
            else ("-" if r.get(c) is None else str(r[c]))
            for c in cols[2:]
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
