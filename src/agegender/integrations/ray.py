"""Age and gender over collections too large for one machine, with Ray Data.

``pip install "agegender[ray]"``. The same code runs on a laptop (Ray starts a local instance)
and on a cluster (``ray start --head`` on one machine, ``ray start --address HEAD:6379`` on the
others, then ``RAY_ADDRESS=HEAD:6379`` where you run it)::

    import ray
    from agegender.integrations.ray import predict_dataset

    ds = ray.data.read_parquet("s3://bucket/paths.parquet")  # a "path" column (or "bytes")
    predict_dataset(ds, aligned=False).write_parquet("s3://bucket/faces/")

or from the shell, reading image files, a folder or a Parquet file of paths::

    python -m agegender.integrations.ray PHOTOS_DIR --output faces/ [--workers 4]

Each row of the result is one image: ``path``, ``faces`` (the JSON list ``agegender predict``
writes for it), ``n_faces`` and ``error`` (None, or why the image could not be read: a bad image
is a row, never a failed task). The model is loaded once per actor of an actor pool of
``workers``; an actor that dies (its machine lost, out of memory) Ray Data starts again and
gives its batches to, as it does by default; batches of ``batch_size`` images keep the network
busy. A rerun with the same output skips the paths already written.

Why Ray Data, rather than Spark's pandas UDFs or Dask: a stateful actor per worker holds the
model and its runtime session for the whole job (Spark reloads UDF state per task or needs
broadcast tricks; Dask has no actor pool for ``map_batches``); it streams, so a billion paths
never sit in memory; the same actors can ask for a GPU (``num_gpus``); and it reads and writes
Parquet locally, on S3 and GCS alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from agegender.core.errors import first_line
from agegender.inference.options import InferenceOptions
from agegender.vision.scan import find_images

try:
    import pyarrow as pa
    import ray
    import ray.data
except ImportError as e:  # pragma: no cover - what a user without the extra sees
    raise ImportError(
        'agegender.integrations.ray needs Ray Data: pip install "agegender[ray]"'
    ) from e

# Declared, not inferred: a batch without one bad image would otherwise type `error` as null,
# and blocks of different types cannot be written to one Parquet dataset.
SCHEMA = pa.schema(
    [("path", pa.string()), ("faces", pa.string()), ("n_faces", pa.int32()), ("error", pa.string())]
)
COLUMNS = tuple(SCHEMA.names)


class FaceActor:
    """What each actor of the pool runs: a
    :class:`~agegender.inference.predictor.Predictor`, loaded once, over batches of image paths
    (or bytes)."""

    def __init__(self, options: InferenceOptions, aligned: bool) -> None:
        from agegender.training.loading import open_predictor

        self.aligned = aligned
        self.predictor = open_predictor(options.replace(detector=None) if aligned else options)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        column = "bytes" if "bytes" in batch else "path"
        items = list(batch[column])
        inputs = [bytes(x) if column == "bytes" else str(x) for x in items]
        names = [str(x) for x in batch["path"]] if "path" in batch else [""] * len(items)
        found = self.predictor.predict_batch(inputs, self.aligned, workers=1)
        out: dict[str, list] = {c: [] for c in COLUMNS}
        for name, res in zip(names, found):
            bad = isinstance(res, Exception)
            faces = [] if bad else [f.to_dict() for f in res]
            out["path"].append(name)
            out["faces"].append(json.dumps(faces))
            out["n_faces"].append(len(faces))
            out["error"].append(first_line(res) if bad else None)
        return pa.Table.from_pydict(out, schema=SCHEMA)


def predict_dataset(
    ds: ray.data.Dataset,
    options: InferenceOptions | str = "default",
    aligned: bool = False,
    batch_size: int = 64,
    workers: int = 2,
    num_gpus: float = 0,
) -> ray.data.Dataset:
    """``ds`` (a ``path`` column, or ``bytes`` with an optional ``path``) -> one row per image
    (see the module). ``options``: an :class:`~agegender.inference.options.InferenceOptions`
    or a model. ``workers`` actors of ``options.threads`` threads each (1 where unset: the
    cluster's CPUs over the threads is a good ``workers``); ``num_gpus`` per actor runs the
    network on torch and CUDA (with ``backend="torch"`` in the options)."""
    if isinstance(options, str):
        options = InferenceOptions(model=options)
    if options.threads is None:
        options = options.replace(threads=1)
    return ds.map_batches(
        FaceActor,
        fn_constructor_args=(options, aligned),
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=workers,
        num_cpus=options.threads,
        num_gpus=num_gpus,
    )


def paths_dataset(paths: list[str | os.PathLike], skip: set[str] = frozenset()) -> ray.data.Dataset:
    """A dataset of the image files given or under the folders given (a ``.parquet`` file: its
    ``path`` column), without those in ``skip``."""
    parquet = [p for p in paths if str(p).endswith(".parquet")]
    if parquet:
        ds = ray.data.read_parquet([str(p) for p in parquet], columns=["path"])
        return ds.filter(lambda row: row["path"] not in skip) if skip else ds
    files = [str(p) for p in find_images(paths) if str(p) not in skip]
    return ray.data.from_items([{"path": f} for f in files])


def done_paths(output: str | os.PathLike) -> set[str]:
    """The paths an earlier run wrote to the Parquet folder ``output``."""
    folder = Path(output)
    if not folder.is_dir() or not any(folder.glob("*.parquet")):
        return set()
    import pyarrow.parquet as pq

    return set(pq.read_table(folder, columns=["path"]).column("path").to_pylist())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m agegender.integrations.ray",
        description="Faces of many images with Ray Data: local, or on the cluster RAY_ADDRESS "
        "names. Writes Parquet: path, faces (JSON), n_faces, error.",
    )
    p.add_argument("paths", nargs="+", help="image files, folders, or .parquet files of paths")
    p.add_argument("--output", required=True, help="a folder of Parquet files (local, s3://)")
    p.add_argument("--model", default="default")
    p.add_argument("--aligned", action="store_true", help="the images are aligned face crops")
    p.add_argument("--workers", type=int, default=2, help="actors (each loads the model once)")
    p.add_argument("--threads", type=int, default=1, help="threads (CPUs) per actor")
    p.add_argument("--gpus", type=float, default=0, help="GPUs per actor (torch backend)")
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args(argv)
    if not ray.is_initialized():  # a caller (a notebook, a test) may have started it
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                 log_to_driver=False)  # fmt: skip
    skip = done_paths(a.output)
    ds = paths_dataset(a.paths, skip)
    if ds.count() == 0:
        print(f"nothing to do: the {len(skip):,} images are in {a.output} already")
        return 0
    gpu = {"backend": "torch", "device": "cuda"} if a.gpus else {}
    options = InferenceOptions(model=a.model, threads=a.threads, **gpu)
    out = predict_dataset(ds, options, a.aligned, a.batch_size, a.workers, a.gpus)
    out.write_parquet(a.output)
    print(f"wrote {a.output} ({len(skip):,} images done before were skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
