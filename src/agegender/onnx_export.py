"""Export a checkpoint to ONNX: uint8 faces in, age / P(female) / age spread out.

The graph includes the model's own normalisation, so an ONNX consumer only has to resize the
face to the model's size and colour (``metadata_props`` of the file say which).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from agegender import fileio
from agegender.checkpoint import load_checkpoint, resolve_checkpoint
from agegender.errors import AgeGenderError, ConfigError, DataError
from agegender.models import normalize


class ExportWrapper(nn.Module):
    """``(B, C, H, W)`` uint8 -> ``age`` (B,), ``p_female`` (B,)[, ``age_std`` (B,)]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.data_config = model.data_config
        self.has_std = model.config.get("age_head") == "dldl"

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(normalize(image, self.data_config))
        p_female = torch.sigmoid(out["gender"])
        if self.has_std:
            return out["age"], p_female, out["age_std"]
        return out["age"], p_female


OPSETS = (7, 20)  # what torch.onnx's TorchScript exporter writes


def export_onnx(
    model: str | os.PathLike = "default",
    out: str | os.PathLike = "agegender.onnx",
    opset: int = 18,
) -> Path:
    """Write ``model`` (``default``, a run folder or a checkpoint) as ONNX with a dynamic batch.

    Returns the path. The file is written atomically.
    """
    if not OPSETS[0] <= opset <= OPSETS[1]:  # outside, the exporter prints the whole graph
        raise ConfigError(f"opset must be {OPSETS[0]}-{OPSETS[1]} (the exporter's), got {opset}")
    path = resolve_checkpoint(model)
    net, meta = load_checkpoint(path, "cpu")
    wrapper = ExportWrapper(net.float()).eval()
    c, h, w = meta["data_config"]["input_size"]
    example = torch.zeros(2, c, h, w, dtype=torch.uint8)
    names = ["age", "p_female"] + (["age_std"] if wrapper.has_std else [])
    out = Path(out)
    if out.is_dir():
        raise DataError(f"{out} is a folder: give the ONNX file's name, e.g. {out / 'model.onnx'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    # whatever fails, no half-written file is left behind
    with fileio.atomic_path(out, ".onnx") as tmp:
        _export(wrapper, example, tmp, names, opset, meta)
    return out


def _export(wrapper: ExportWrapper, example, tmp: Path, names: list[str], opset: int, meta):
    c, h, w = example.shape[1:]
    try:
        with warnings.catch_warnings():
            # the tracer warns about normalize()'s shape check and constants: both are fine
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # the legacy exporter is chosen on purpose (dynamic_axes, no onnxscript needed);
            # its DeprecationWarning, attributed to this module, must not become an error
            warnings.filterwarnings(
                "ignore", "You are using the legacy TorchScript", DeprecationWarning
            )
            torch.onnx.export(
                wrapper,
                (example,),
                str(tmp),
                input_names=["image"],
                output_names=names,
                opset_version=opset,
                dynamo=False,
                dynamic_axes={"image": {0: "batch"}, **{n: {0: "batch"} for n in names}},
            )
    except Exception as e:  # an exporter failure is not the user's input: say what broke
        # its first line says it; the rest can be the whole graph, hundreds of lines
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise AgeGenderError(
            f"ONNX export failed (opset {opset}): {type(e).__name__}: {first}"
        ) from e
    proto = onnx.load(str(tmp))
    for key, value in {
        "agegender_model": json.dumps(meta["model"]),
        "agegender_data_config": json.dumps(meta["data_config"]),
        "input": f"uint8 (batch, {c}, {h}, {w}), {meta['data_config']['color']}, 0-255",
    }.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(tmp))
