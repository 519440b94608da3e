"""A :class:`~agegender.inference.predictor.Predictor` for any model, torch's side included.

The predictor itself opens ONNX files only. This module adds what needs torch: a checkpoint
without an up-to-date ONNX file is exported once (beside it, or in the user's cache for a
bundled model) and opened, and ``backend="torch"`` builds a :class:`TorchBackend` and hands it
to the predictor. The command line, the web service and evaluation load models through
:func:`open_predictor`; torch is imported only when one of those two things happens, so a
plain install predicts with ONNX files without it.
"""

from __future__ import annotations

import os
from typing import Any

from agegender.core.errors import AgeGenderError
from agegender.inference.model_files import NeedsExport, read_meta, resolve_checkpoint
from agegender.inference.options import InferenceOptions
from agegender.inference.predictor import Predictor, as_options

TRAIN_EXTRA = 'pip install "agegender[train]"'


def require_torch(what: str) -> None:
    """Raise a one-line error naming the extra when torch is not installed."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise AgeGenderError(f"{what} needs torch: {TRAIN_EXTRA}") from None


def torch_backend(options: InferenceOptions) -> Any:
    """The checkpoint ``options.model`` on torch, on ``options.device`` with its ``amp``."""
    require_torch("backend torch")
    import torch

    from agegender.training.checkpoint import load_checkpoint
    from agegender.training.torch_backend import TorchBackend, resolve_device, use_amp

    path = resolve_checkpoint(options.model)
    meta = read_meta(path)
    net, _ = load_checkpoint(path, "cpu")
    net = net.float()
    if options.threads:
        torch.set_num_threads(options.threads)
    dev = resolve_device(options.device, option="--device")
    net = net.to(dev)
    if dev.type == "cpu":  # oneDNN's bf16 convolutions (AMX) want NHWC
        net = net.to(memory_format=torch.channels_last)
    return TorchBackend(net, dev, amp=use_amp(dev, options.amp), meta=meta, path=path)


def open_predictor(
    options: InferenceOptions | str | os.PathLike | None = None, /, **changes: Any
) -> Predictor:
    """:meth:`Predictor.load`, exporting a checkpoint to ONNX first where it needs it, or
    on torch for ``backend="torch"``."""
    opts = as_options(options, changes)
    if opts.backend == "torch":
        return Predictor.load(opts, runner=torch_backend(opts))
    try:
        return Predictor.load(opts)
    except NeedsExport as e:
        require_torch(f"{e.checkpoint} has no up-to-date ONNX file; exporting it")
        from agegender.training.onnx_export import export_onnx

        try:
            export_onnx(e.checkpoint, e.target)  # written atomically
        except OSError as err:  # a run folder on read-only storage, a full disk
            raise AgeGenderError(
                f"cannot write {e.target} ({err.strerror or err}): export the model where you "
                f"can write, agegender export --model {e.checkpoint} --onnx OTHER.onnx, and "
                "predict with --model OTHER.onnx"
            ) from None
    try:
        return Predictor.load(opts)
    except NeedsExport as e:
        raise AgeGenderError(f"{e.target} cannot be loaded, even exported again") from None
