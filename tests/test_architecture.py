"""The layers of ARCHITECTURE.md, checked on the code: each subpackage imports only those below
it, the inference path reaches neither torch nor the training code, functions stay short and
the inference options are declared once."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from agegender.inference.options import option_names

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "agegender"

#: the subpackages from the bottom up: each may import those before it, never one after it
LAYERS = ("core", "vision", "data", "inference", "training", "evaluation", "serve", "cli")
#: adapters to other engines sit above training (their actors load through it), below the rest
BESIDE = {"integrations": "training"}
#: what predicting and preparing data must never need
HEAVY = ("torch", "onnx", "safetensors", "matplotlib")
TORCH_FREE_LAYERS = ("core", "vision", "data", "inference")

#: functions over 60 lines, with their length today: this list may only shrink (a function
#: that grows or joins it wants named steps of its own instead)
LONG_FUNCTIONS: dict[str, int] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any level (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "agegender" else None


def _rank(layer: str) -> int:
    return LAYERS.index(BESIDE.get(layer, layer)) + (layer in BESIDE) * 0.5


def test_every_module_lives_in_a_layer():
    loose = {
        name
        for name in _modules()
        if _layer(name) not in (*LAYERS, *BESIDE)
        and name not in ("agegender", "agegender.__main__")
    }
    assert not loose, f"modules outside the layers: {sorted(loose)}"
    assert len([p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]) >= 4


def test_no_layer_imports_one_above_it():
    for name, path in _modules().items():
        mine = _layer(name)
        if mine not in (*LAYERS, *BESIDE):
            continue
        for dep in _imports(path):
            theirs = _layer(dep)
            if theirs in (*LAYERS, *BESIDE) and theirs != mine:
                assert _rank(theirs) < _rank(mine), f"{name} ({mine}) imports {dep} ({theirs})"


def test_the_torch_free_layers_import_nothing_heavy_at_any_level():
    for name, path in _modules().items():
        if _layer(name) not in TORCH_FREE_LAYERS:
            continue
        heavy = {d for d in _imports(path) if d.split(".")[0] in HEAVY}
        assert not heavy, f"{name} imports {sorted(heavy)}"


def test_nothing_reachable_from_the_predictor_imports_torch():
    """The closure of the Predictor's module over agegender imports at any level."""
    modules = _modules()
    seen, todo = set(), ["agegender.inference.predictor"]
    while todo:
        name = todo.pop()
        if name in seen or name not in modules:
            continue
        seen.add(name)
        deps = _imports(modules[name])
        assert not {d for d in deps if d.split(".")[0] in HEAVY}, name
        todo += [d for d in deps if d.startswith("agegender.")]
    assert not any(_layer(m) == "training" for m in seen), sorted(seen)
    assert "agegender.vision.detect" in seen


def test_importing_the_inference_path_loads_no_torch_and_no_training_loop():
    code = (
        "import sys, agegender, agegender.inference.predictor, agegender.inference.draw, "
        "agegender.cli.main, agegender.cli.photos, agegender.serve.app; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m == 'agegender.training.train'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _functions():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rel = path.relative_to(PACKAGE).as_posix()
                yield f"{rel}:{node.name}", node


def test_functions_are_short_and_the_long_list_only_shrinks():
    long = {}
    for name, node in _functions():
        length = node.end_lineno - node.lineno + 1
        assert length <= 80, f"{name} is {length} lines"
        if length > 60:
            long[name] = max(long.get(name, 0), length)
    for name, length in long.items():
        assert name in LONG_FUNCTIONS, f"{name} is {length} lines (at most 60 for a new one)"
        assert length <= LONG_FUNCTIONS[name], f"{name} grew to {length} lines"
    gone = set(LONG_FUNCTIONS) - set(long)
    assert not gone, f"shorter now, take them off LONG_FUNCTIONS: {sorted(gone)}"


def test_the_inference_options_are_declared_once():
    """At most one public signature takes three or more of the options one by one; the rest
    take an InferenceOptions. A parameter of a torch type (a network, a ``torch.device``) is
    what an option was resolved to, not the option."""
    names = set(option_names())
    many = []
    for name, node in _functions():
        if node.name.startswith("_") and node.name != "__init__":
            continue
        a = node.args
        params = {
            p.arg
            for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)
            if not (p.annotation and {"torch", "nn"} & set(ast.unparse(p.annotation).split(".")))
        }
        if len(params & names) >= 3:
            many.append(name)
    assert len(many) <= 1, many


def test_the_training_loop_stays_readable():
    """One file of plain functions in reading order, none over 60 lines: a file to read top to
    bottom, so its length is bounded too."""
    assert len((PACKAGE / "training" / "train.py").read_text().splitlines()) <= 620


@pytest.mark.parametrize("layer", TORCH_FREE_LAYERS)
def test_each_torch_free_layer_imports_in_a_process_without_torch(layer):
    code = (
        "import sys; sys.modules.update(dict.fromkeys(['torch', 'onnx', 'safetensors', "
        f"'matplotlib'])); import pkgutil, importlib, agegender.{layer} as p; "
        "[importlib.import_module(m.name) for m in "
        "pkgutil.walk_packages(p.__path__, p.__name__ + '.')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
