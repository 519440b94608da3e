"""Private mode: a static folder in which the whole pipeline runs in the visitor's browser.

:func:`write_site` writes a folder that any static web server (``python -m http.server``,
GitHub Pages, nginx, ``agegender serve`` at ``/private/``) can serve: the page, its script, ONNX
Runtime Web (vendored under ``site/vendor/ort`` by ``tools/vendor_ort_web.py``), the YuNet
detector and the age/gender model. It needs HTTP: browsers refuse a ``file://`` page's
requests for the models. Detection, alignment and the network all run in the browser
(WebAssembly, one thread, so no cross-origin-isolation headers are needed), and the page asks
nothing of any other host: every URL in it is relative.

>>> sorted(SITE_FILES)[:2]
['app.js', 'index.html']
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from agegender.core.errors import AgeGenderError
from agegender.inference.model_files import BUNDLED_NAMES, bundled, model_tta
from agegender.vision.detect import MODEL_SHA256, YUNET_MODEL, ModelFileError

__all__ = [
    "MARKER",
    "SITE",
    "SITE_FILES",
    "SiteError",
    "detector_bytes",
    "model_config",
    "model_file",
    "write_site",
]

#: the page's own files, in the package
SITE = Path(__file__).resolve().parents[1] / "site"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
#: what is copied from :data:`SITE` (the vendored runtime's folder whole, besides)
SITE_FILES = ("index.html", "app.js")
#: what the private page shares with the served one: its look and how it labels faces
SHARED_FILES = ("faces.css", "faces.js")
#: the file that marks a folder as written by :func:`write_site`: only such a folder (or an
#: empty one) is ever replaced
MARKER = ".agegender-site"


class SiteError(AgeGenderError):
    """The site cannot be written (the target is not a site folder, files are missing)."""


# --------------------------------------------------------------------------- the detector

# YuNet's graph declares a fixed 1x3x640x640 input; OpenCV ignores that and reshapes, but ONNX
# Runtime enforces it. Its layers take any size (reshapes use -1, upsampling uses scales), so
# the page's copy has its inputs', outputs' and intermediate shapes removed. Editing the
# protobuf wire format by hand keeps the onnx package (a training extra) out of serving.
_GRAPH = 7  # ModelProto.graph
_NODE, _INITIALIZER, _INPUT, _OUTPUT, _VALUE_INFO = 1, 5, 11, 12, 13  # GraphProto.*
_TYPE, _TENSOR, _SHAPE = 2, 1, 2  # ValueInfoProto.type, TypeProto.tensor_type, Tensor.shape
_NODE_INPUT, _OP_TYPE, _ATTRIBUTE = 1, 4, 5  # NodeProto.*
_DIMS, _TENSOR_NAME = 1, 8  # TensorProto.*
_ATTR_NAME = 1  # AttributeProto.name


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(data: bytes) -> list[tuple[int, int, bytes]]:
    """A protobuf message's fields in order: ``(number, wire type, raw bytes of the field)``."""
    out, i = [], 0
    while i < len(data):
        start = i
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            size, i = _varint(data, i)
            i += size
        elif wire == 5:
            i += 4
        else:
            raise SiteError(f"unexpected protobuf wire type {wire} in the detector model")
        out.append((number, wire, data[start:i]))
    return out


def _payload(raw: bytes) -> bytes:
    """The body of a length-delimited field's raw bytes."""
    _, i = _varint(raw, 0)
    _, i = _varint(raw, i)
    return raw[i:]


def _field(number: int, body: bytes) -> bytes:
    return _put_varint(number << 3 | 2) + _put_varint(len(body)) + body


def _edit(data: bytes, edits: dict[int, Any]) -> bytes:
    """``data`` with each length-delimited field whose number is in ``edits`` rewritten by it
    (a function of the body returning the new body, or None to drop the field)."""
    out = bytearray()
    for number, wire, raw in _fields(data):
        if wire == 2 and number in edits:
            body = edits[number](_payload(raw))
            if body is not None:
                out += _field(number, body)
        else:
            out += raw
    return bytes(out)


def _drop_shape(value_info: bytes) -> bytes:
    def tensor(body: bytes) -> bytes:
        return _edit(body, {_SHAPE: lambda _: None})

    return _edit(value_info, {_TYPE: lambda t: _edit(t, {_TENSOR: tensor})})


def _strings(message: bytes, number: int) -> list[str]:
    return [_payload(raw).decode() for n, w, raw in _fields(message) if n == number and w == 2]


def _one_element(graph: bytes) -> set[str]:
    """Names of the graph's initializers that hold one element (all dims 1, or none)."""
    names = set()
    for n, w, raw in _fields(graph):
        if n != _INITIALIZER or w != 2:
            continue
        tensor = _payload(raw)
        dims = []
        for m, wire, field in _fields(tensor):
            if m == _DIMS and wire == 0:
                dims.append(_varint(field, 1)[0])
            elif m == _DIMS and wire == 2:  # packed
                body, i = _payload(field), 0
                while i < len(body):
                    d, i = _varint(body, i)
                    dims.append(d)
        if all(d == 1 for d in dims) and len(dims) <= 1:
            names.update(_strings(tensor, _TENSOR_NAME))
    return names


def _per_tensor_blocks(graph: bytes) -> bytes:
    """The 20 bias DequantizeLinear nodes carry ``block_size=64`` with a one-element scale:
    one block, i.e. per-tensor, which OpenCV accepts and ONNX Runtime refuses ("block_size
    must be 0 for per-tensor quantization"); their ``block_size`` is dropped (same result)."""
    scalars = _one_element(graph)

    def node(body: bytes) -> bytes:
        inputs = _strings(body, _NODE_INPUT)
        if _strings(body, _OP_TYPE) != ["DequantizeLinear"] or len(inputs) < 2:
            return body
        if inputs[1] not in scalars:
            return body

        def attribute(attr: bytes) -> bytes | None:
            return None if _strings(attr, _ATTR_NAME) == ["block_size"] else attr

        return _edit(body, {_ATTRIBUTE: attribute})

    return _edit(graph, {_NODE: node})


def detector_bytes() -> bytes:
    """The vendored YuNet model (SHA-256 checked) made loadable by ONNX Runtime at any size.

    Every shape is left free, so that it runs on images of any size as OpenCV runs it, and the
    per-tensor quantisations written as one block are written plainly (see
    :func:`_per_tensor_blocks`). The weights and the computation are unchanged.
    """
    data = YUNET_MODEL.read_bytes()
    if hashlib.sha256(data).hexdigest() != MODEL_SHA256:
        raise ModelFileError(f"face detector model altered or corrupt: {YUNET_MODEL}")
    shapes = {_INPUT: _drop_shape, _OUTPUT: _drop_shape, _VALUE_INFO: lambda _: None}
    return _edit(data, {_GRAPH: lambda g: _edit(_per_tensor_blocks(g), shapes)})


# --------------------------------------------------------------------------- the model


def model_config(path: Path) -> dict[str, Any]:
    """What the page needs to know of a model, read from the ONNX file's ``agegender``
    metadata: its ``data_config`` and whether it predicts with flip TTA."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    text = session.get_modelmeta().custom_metadata_map.get("agegender")
    if not text:
        raise SiteError(f"{path} carries no agegender model description")
    meta = json.loads(text)
    return {
        "file": "model.onnx",
        "name": path.name,
        "data_config": meta["data_config"],
        "tta": model_tta(meta),
    }


def model_file(model: str | os.PathLike = "default") -> Path:
    """The ONNX file to ship: a path to an ``.onnx`` export, or a bundled model's name
    (``default``, ``accurate``: its int8 file, else its fp32 one).

    int8 by default: in ONNX Runtime Web it takes 60 % of fp32's time a face at half the
    download, and kept fp32's accuracy on 300 UTKFace faces (MAE 3.77 vs 3.76 years, same
    gender accuracy), as on x86.
    """
    path = Path(model)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise SiteError(f"no such model file: {path}")
        return path
    if str(model) not in BUNDLED_NAMES:
        names = ", ".join(BUNDLED_NAMES)
        raise SiteError(f"model must be an .onnx file or a bundled name ({names}), got {model}")
    weights = bundled(str(model))
    for candidate in (weights.with_suffix(".int8.onnx"), weights.with_suffix(".onnx")):
        if candidate.is_file():
            return candidate
    raise SiteError(f"the bundled model {model} has no ONNX file")


# --------------------------------------------------------------------------- the folder


def _check_target(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise SiteError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise SiteError(f"{out} is not empty and was not written by agegender site: not replaced")


def _fill(stage: Path, model: Path) -> None:
    for name in SITE_FILES:
        shutil.copyfile(SITE / name, stage / name)
    for name in SHARED_FILES:
        shutil.copyfile(ASSETS / name, stage / name)
    vendor = SITE / "vendor" / "ort"
    if not (vendor / "VERSION.json").is_file():
        raise SiteError(f"{vendor} is missing: run python tools/vendor_ort_web.py")
    shutil.copytree(vendor, stage / "vendor" / "ort")
    models = stage / "models"
    models.mkdir()
    (models / "yunet.onnx").write_bytes(detector_bytes())
    shutil.copyfile(model, models / "model.onnx")
    (models / "model.json").write_text(json.dumps(model_config(model), indent=1) + "\n")
    shutil.copyfile(YUNET_MODEL.with_name("YUNET_LICENSE.txt"), models / "YUNET_LICENSE.txt")
    shutil.copyfile(bundled("default").with_name("TERMS.md"), models / "MODEL_TERMS.md")
    (stage / MARKER).write_text("written by agegender.serve.site.write_site\n")


def write_site(out_dir: str | os.PathLike, model: str | os.PathLike = "default") -> Path:
    """Write the private-mode site into ``out_dir`` and return its path.

    ``model``: an agegender ``.onnx`` export or a bundled model's name (see
    :func:`model_file`); by default the bundled ``default`` model, int8. The folder is built
    beside ``out_dir`` and swapped in whole, so a failed write leaves the old one; ``out_dir``
    is replaced only when it is empty or was written by this function (it holds
    :data:`MARKER`), else :class:`SiteError`. About 7 MB with the default model.
    """
    out = Path(out_dir).absolute()
    src = model_file(model)
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        stage.chmod(0o755)  # mkdtemp's 0700 would hide the site from a web server's user
        _fill(stage, src)
        old = out.with_name(f".{out.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out
