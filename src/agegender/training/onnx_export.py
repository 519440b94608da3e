"""Export a checkpoint to ONNX: uint8 faces in, age / P(female) / age spread out.

The graph includes the model's own normalisation, so an ONNX consumer only has to resize the
face to the model's size and colour (``metadata_props`` of the file say which).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import torch
from torch import nn

from agegender.core import fileio
from agegender.core.errors import AgeGenderError, ConfigError, DataError
from agegender.inference.model_files import resolve_checkpoint
from agegender.training.checkpoint import load_checkpoint
from agegender.training.models import normalize


class ExportWrapper(nn.Module):
    """``(B, C, H, W)`` uint8 -> ``age`` (B,), ``p_female`` (B,)[, ``age_std`` (B,),
    ``age_probs`` (B, K): the age distribution, which a video track pools over its frames]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.data_config = model.data_config
        self.has_std = model.config.get("age_head") == "dldl"

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(normalize(image, self.data_config))
        p_female = torch.sigmoid(out["gender"])
        if self.has_std:
            probs = out["age_logits"].float().softmax(dim=-1)
            return out["age"], p_female, out["age_std"], probs
        return out["age"], p_female


OPSETS = (7, 20)  # what torch.onnx's TorchScript exporter writes


def export_onnx(
    model: str | os.PathLike = "default",
    out: str | os.PathLike = "agegender.onnx",
    opset: int = 18,
    half_weights: bool = False,
) -> Path:
    """Write ``model`` (``default``, a run folder or a checkpoint) as ONNX with a dynamic batch.

    ``half_weights`` stores the weights as fp16, each cast to fp32 when the file is loaded
    (onnxruntime folds the casts at start-up): half the file, the same fp32 arithmetic, and no
    loss at all for a checkpoint whose weights are fp16 already (the bundled ones). Returns the
    path. The file is written atomically.
    """
    if not OPSETS[0] <= opset <= OPSETS[1]:  # outside, the exporter prints the whole graph
        raise ConfigError(f"opset must be {OPSETS[0]}-{OPSETS[1]} (the exporter's), got {opset}")
    path = resolve_checkpoint(model)
    net, meta = load_checkpoint(path, "cpu")
    wrapper = ExportWrapper(net.float()).eval()
    c, h, w = meta["data_config"]["input_size"]
    example = torch.zeros(2, c, h, w, dtype=torch.uint8)
    names = ["age", "p_female"] + (["age_std", "age_probs"] if wrapper.has_std else [])
    out = Path(out)
    if out.is_dir():
        raise DataError(f"{out} is a folder: give the ONNX file's name, e.g. {out / 'model.onnx'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    # whatever fails, no half-written file is left behind
    with fileio.atomic_path(out, ".onnx") as tmp:
        # weights stored in half stay exactly the checkpoint's when the exporter does not fold
        # BatchNorm into them (onnxruntime folds it at load, in fp32)
        _export(wrapper, example, tmp, names, opset, meta, fold=not half_weights)
        if half_weights:
            proto = onnx.load(str(tmp))
            _store_half(proto)
            onnx.save(proto, str(tmp))
    return out


def _store_half(proto: onnx.ModelProto, smallest: int = 256) -> None:
    """Float initializers of ``smallest`` values or more stored as fp16, behind a Cast."""
    graph = proto.graph
    casts, halves = [], []
    for init in list(graph.initializer):
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < smallest:
            continue
        half = onnx.numpy_helper.from_array(
            onnx.numpy_helper.to_array(init).astype(np.float16), f"{init.name}.fp16"
        )
        graph.initializer.remove(init)
        halves.append(half)
        casts.append(
            onnx.helper.make_node("Cast", [half.name], [init.name], to=onnx.TensorProto.FLOAT)
        )
    graph.initializer.extend(halves)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)  # before their users: the graph stays in order


def _export(
    wrapper: ExportWrapper, example, tmp: Path, names: list[str], opset: int, meta, fold: bool
) -> None:
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
                do_constant_folding=fold,
                dynamic_axes={"image": {0: "batch"}, **{n: {0: "batch"} for n in names}},
            )
    except Exception as e:  # an exporter failure is not the user's input: say what broke
        # its first line says it; the rest can be the whole graph, hundreds of lines
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise AgeGenderError(
            f"ONNX export failed (opset {opset}): {type(e).__name__}: {first}"
        ) from e
    proto = onnx.load(str(tmp))
    described = {k: v for k, v in meta.items() if k in DESCRIBED}
    _set_metadata(
        proto,
        {
            # everything a predictor needs, read without torch through onnxruntime
            "agegender": json.dumps(described, default=str),
            "agegender_model": json.dumps(meta["model"]),
            "agegender_data_config": json.dumps(meta["data_config"]),
            "input": f"uint8 (batch, {c}, {h}, {w}), {meta['data_config']['color']}, 0-255",
        },
    )
    onnx.save(proto, str(tmp))


#: what of a checkpoint's metadata its ONNX file carries (the weights' record stays behind)
DESCRIBED = ("format", "version", "model", "data_config", "epoch", "metrics", "config", "seen")


def _set_metadata(proto: onnx.ModelProto, values: dict[str, str]) -> None:
    keep = [p for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


class _Faces:
    """onnxruntime's calibration reader over uint8 faces ``(N, H, W, C)``, a batch at a time."""

    def __init__(self, faces: np.ndarray, input_name: str, batch: int = 32) -> None:
        # whole batches only: the calibrator stacks every batch's outputs, so a ragged last one
        # fails it (fewer faces than a batch: one batch of them all)
        self.batch = min(batch, len(faces))
        self.faces = faces[: len(faces) - len(faces) % self.batch] if self.batch else faces
        self.name, self.at = input_name, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.at >= len(self.faces) or not self.batch:
            return None
        x = self.faces[self.at : self.at + self.batch].transpose(0, 3, 1, 2)
        self.at += self.batch
        return {self.name: np.ascontiguousarray(x)}


#: the ops that pool a feature map to one vector: what follows them is the model's heads
POOLING = ("GlobalAveragePool", "ReduceMean")


def _after_pooling(graph: onnx.GraphProto) -> list[str]:
    """The names of the nodes downstream of the graph's pooling (every member's, in an
    ensemble): the heads and what turns their outputs into ages and probabilities."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    todo = [out for node in graph.node if node.op_type in POOLING for out in node.output]
    found: dict[str, None] = {}
    while todo:
        for node in consumers.get(todo.pop(), []):
            if node.name not in found:
                found[node.name] = None
                todo.extend(node.output)
    return list(found)


def quantize_onnx(
    fp32: str | os.PathLike, out: str | os.PathLike, faces: np.ndarray, reduce_range: bool = True
) -> Path:
    """A statically quantised copy of an exported model: int8 weights per output channel,
    uint8 activations, QDQ format, the ranges (99.999th percentiles) calibrated on ``faces``
    (``(N, H, W, C)`` uint8 at the model's size: training faces, never test ones).
    ``reduce_range`` keeps weights to 7 bits, so that CPUs without VNNI (AVX2) cannot saturate
    in their int8 dot products.
    Written atomically, with the fp32 file's metadata."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = Path(out)
    name = onnx.load(str(fp32)).graph.input[0].name
    with fileio.atomic_path(out, ".onnx") as tmp, fileio.atomic_path(out, ".pre.onnx") as pre:
        # shapes inferred and BatchNorm folded into the convolutions first, as onnxruntime
        # advises: the weights are then quantised as they will be used
        quant_pre_process(str(fp32), str(pre))
        heads = _after_pooling(onnx.load(str(pre)).graph)
        quantize_static(
            str(pre),
            str(tmp),
            _Faces(faces, name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # ranges from the 99.999th percentile rather than the extremes: on the bundled
            # accurate model MinMax lost 0.15 points of gender accuracy, this none (and 0.01
            # years of MAE) on the test split (tools/bundle_model.py checks each model)
            calibrate_method=CalibrationMethod.Percentile,
            # the heads stay float: a softmax over 117 ages read from uint8 activations keeps
            # its mean but loses its tails, and the age interval then covered 80 % of true ages
            # instead of 90 % (they are a few thousand multiply-adds of the millions)
            nodes_to_exclude=heads,
        )
        proto = onnx.load(str(tmp))
        meta = {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}
        meta["agegender_precision"] = "int8"
        _set_metadata(proto, meta)
        onnx.save(proto, str(tmp))
    return out
