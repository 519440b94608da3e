"""The layers of ARCHITECTURE.md, checked on the code: library below, commands above, and an
inference path that needs neither torch nor the training code."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "agegender"

#: library modules that must import without torch (inference, data, reports)
TORCH_FREE = (
    "errors",
    "fileio",
    "config",
    "images",
    "data",
    "labels",
    "metrics",
    "detect",
    "runtime",
    "model_files",
    "predict",
    "draw",
    "runs",
    "synthetic",
    "near_dups",
    "video",
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Every module ``path`` imports (function-level imports too, unless ``top_level_only``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_the_library_never_imports_a_command():
    modules = _modules()
    # __main__ is `python -m agegender`: the command line itself
    library = {
        n: p
        for n, p in modules.items()
        if not n.startswith("agegender.commands") and n != "agegender.__main__"
    }
    assert {"agegender.predict", "agegender.models", "agegender.images"} <= set(library)
    for name, path in library.items():
        above = sorted(i for i in _imports(path) if i.startswith("agegender.commands"))
        assert not above, f"{name} (library) imports {above} (commands)"


def test_only_commands_import_the_training_loop():
    for name, path in _modules().items():
        if "agegender.commands.train" in _imports(path):
            assert name.startswith("agegender.commands"), name


@pytest.mark.parametrize("module", TORCH_FREE)
def test_inference_and_data_modules_import_no_torch_at_module_level(module):
    imports = _imports(PACKAGE / f"{module}.py", top_level_only=True)
    assert not {i for i in imports if i == "torch" or i.startswith("torch.")}
    modules = _modules()
    # ... nor a library module that does
    for dep in imports:
        if dep.startswith("agegender.") and dep in modules and dep.count(".") == 1:
            assert dep.split(".")[1] in TORCH_FREE, f"{module} imports {dep}, which needs torch"


def test_importing_the_inference_path_loads_no_torch_and_no_training_code():
    code = (
        "import sys, agegender, agegender.predict, agegender.draw, agegender.commands.cli, "
        "agegender.commands.predict, agegender.commands.serve; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m == 'agegender.commands.train'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_function_is_long():
    """~120 lines at most: a longer one is several steps that want names of their own."""
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 125, f"{path.name}:{node.name} is {length} lines"


def test_the_training_loop_stays_readable():
    assert len((PACKAGE / "commands" / "train.py").read_text().splitlines()) <= 600
