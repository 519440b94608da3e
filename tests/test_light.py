"""What a plain ``pip install agegender`` (no torch, no training extra) can do: predict the demo
photo, run ``agegender demo`` and serve the page, in processes where the training extra's
packages cannot be imported at all."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from agegender.inference.predictor import ASTRONAUT

#: the ``train`` extra: none of them may be needed to predict or to serve
TRAIN_EXTRA = ("torch", "safetensors", "onnx", "matplotlib")

BLOCKER = f"""
import sys

class _NotInstalled:
    # a finder that says the training extra is not installed, as in a plain pip install
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TRAIN_EXTRA!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
"""


@pytest.fixture(scope="module")
def light_env(tmp_path_factory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("light-site")
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _agegender(args: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "import sys; from agegender.cli.main import main; "
           "sys.exit(main(sys.argv[1:]))", *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, **kw)


def test_the_blocker_blocks(light_env):
    out = subprocess.run([sys.executable, "-c", "import torch"], env=light_env,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 1 and "No module named 'torch'" in out.stderr


def test_predict_and_demo_without_the_training_extra(light_env, tmp_path):
    out = tmp_path / "faces.jsonl"
    r = _agegender(["predict", str(ASTRONAUT), "--output", str(out), "--quiet"], light_env)
    assert r.returncode == 0, r.stderr
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    (face,) = row["faces"]
    assert face["gender"] == "female" and 30 <= face["age"] <= 70  # Eileen Collins, 41 then
    r = _agegender(["demo", "--out", str(tmp_path / "demo")], light_env)
    assert r.returncode == 0, r.stderr
    assert any(p.suffix in (".jpg", ".png") for p in (tmp_path / "demo").iterdir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _multipart(field: str, name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def test_serve_without_the_training_extra(light_env):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", "import sys; from agegender.cli.main import main; "
         "sys.exit(main(sys.argv[1:]))", "serve", "--port", str(port)],
        env=light_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    assert json.loads(r.read())["status"] == "ok"
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "the service did not start"
                time.sleep(0.3)
        with urllib.request.urlopen(base + "/", timeout=10) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        body, ctype = _multipart("image", "astronaut.jpg", Path(ASTRONAUT).read_bytes())
        req = urllib.request.Request(base + "/api/predict", data=body, method="POST")
        req.add_header("Content-Type", ctype)
        with urllib.request.urlopen(req, timeout=30) as r:
            (face,) = json.loads(r.read())["faces"]
        assert face["gender"] == "female"
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_every_help_works_without_the_training_extra(light_env):
    """Building a parser imports nothing of the train extra: ``--help`` of every command."""
    from agegender.cli.main import COMMANDS

    code = (
        "import sys; sys.modules['torch'] = None; from agegender.cli.main import main\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        main([name, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, name\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{TRAIN_EXTRA!r} and sys.modules[m] is not None))"
    )
    r = subprocess.run([sys.executable, "-c", code, *COMMANDS], env=light_env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("usage: agegender") == len(COMMANDS)
    assert r.stdout.strip().endswith("[]")


@pytest.mark.parametrize(
    "args",
    [
        ["train", "configs/smoke.toml"],
        ["summary", "seed-cnn"],
        ["sweep", "s.toml", "--data", "c"],
        ["explore", "c", "--out", "e"],
        ["evaluate", "default", "--out", "e"],
        ["show", "default", "--out", "g.png"],
        ["export", "--onnx", "m.onnx"],
        ["demo", "--synthetic"],
    ],
    ids=lambda a: a[0] if a[0] != "demo" else "demo-synthetic",
)
def test_commands_of_the_training_extra_name_it(light_env, tmp_path, args):
    r = _agegender(args, light_env, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and 'pip install "agegender[train]"' in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_second_predict_writing_the_same_output_is_refused(light_env, tmp_path):
    out = tmp_path / "faces.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from agegender.core import fileio\n"
         f"with fileio.output_file({str(out)!r}, 'JSON lines') as f:\n"
         "    f.write('first\\n'); print('held', flush=True); sys.stdin.readline()"],
        env=light_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        r = _agegender(["predict", str(ASTRONAUT), "--output", str(out), "--quiet"], light_env)
        assert r.returncode == 2, r.stderr
        assert f"is being written by another run (pid {holder.pid})" in r.stderr
        assert r.stderr.count("\n") == 1
    finally:
        holder.communicate("\n", timeout=60)
    assert out.read_text() == "first\n"  # the first run's output, not replaced
    r = _agegender(["predict", str(ASTRONAUT), "--output", str(out), "--quiet"], light_env)
    assert r.returncode == 0 and json.loads(out.read_text().splitlines()[0])["faces"]
