"""Vendor ONNX Runtime Web (npm ``onnxruntime-web``, MIT) into the private-mode page.

    python tools/vendor_ort_web.py [--version 1.31.1]

Runs ``npm pack onnxruntime-web@VERSION`` in a temporary folder (the registry's ordinary client;
nothing is installed) and copies into ``src/agegender/site/vendor/ort/`` the three files the
page needs, and only those:

- ``ort.wasm.min.js``: the wasm-only build of the JavaScript API (a classic script, global
  ``ort``), 54 KB;
- ``ort-wasm-simd-threaded.mjs``: the Emscripten loader it imports, 25 KB;
- ``ort-wasm-simd-threaded.wasm.gz``: the SIMD runtime, gzipped (14.8 MB -> 3.8 MB). Static
  hosts are not all configured to compress ``.wasm``, so the page inflates it itself with the
  browser's ``DecompressionStream``. Since 1.19 npm ships only the threaded build; with one
  thread it runs without the cross-origin-isolation headers that threads would need.

It writes ``LICENSE`` (the npm tarball has none: the MIT text of the ONNX Runtime repository,
which ``package.json`` names) and ``VERSION.json``: the version, the tarball's integrity and
every copied file's SHA-256 (the gzipped file's of its inflated bytes too), which
``tests/test_site.py`` checks.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "1.31.1"
OUT = Path(__file__).resolve().parents[1] / "src/agegender/site/vendor/ort"
#: file in the tarball's dist/ -> whether it is stored gzipped
FILES = {
    "ort.wasm.min.js": False,
    "ort-wasm-simd-threaded.mjs": False,
    "ort-wasm-simd-threaded.wasm": True,
}

# The MIT licence of https://github.com/microsoft/onnxruntime (its LICENSE file).
LICENSE = """MIT License

Copyright (c) Microsoft Corporation

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack(version: str, work: Path) -> tuple[Path, dict]:
    """``npm pack`` the version into ``work``: ``(the unpacked package folder, npm's record)``."""
    try:
        done = subprocess.run(
            ["npm", "pack", f"onnxruntime-web@{version}", "--json"],
            cwd=work,
            capture_output=True,
            text=True,
            check=True,
        )
    except FileNotFoundError:
        sys.exit("vendor_ort_web: npm not found (install Node.js)")
    except subprocess.CalledProcessError as e:
        lines = e.stderr.strip().splitlines()
        sys.exit(f"vendor_ort_web: npm pack failed: {lines[-1] if lines else e}")
    record = json.loads(done.stdout)[0]
    with tarfile.open(work / record["filename"]) as tar:
        tar.extractall(work, filter="data")
    return work / "package", record


def vendor(version: str, out: Path) -> dict:
    """Copy the runtime's files into ``out`` (replaced whole); returns what VERSION.json says."""
    with tempfile.TemporaryDirectory() as tmp:
        package, record = pack(version, Path(tmp))
        meta = json.loads((package / "package.json").read_text())
        if meta.get("license") != "MIT":
            sys.exit(f"vendor_ort_web: licence is {meta.get('license')!r}, expected MIT")
        stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=".ort-"))
        stage.chmod(0o755)  # mkdtemp makes it 0700
        files = {}
        for name, gz in FILES.items():
            data = (package / "dist" / name).read_bytes()
            entry = {"sha256": sha256(data), "bytes": len(data)}
            if gz:
                packed = gzip.compress(data, compresslevel=9, mtime=0)
                entry.update(gzip_sha256=sha256(packed), gzip_bytes=len(packed))
                name, data = name + ".gz", packed
            (stage / name).write_bytes(data)
            files[name] = entry
    (stage / "LICENSE").write_text(LICENSE)
    info = {
        "package": "onnxruntime-web",
        "version": version,
        "license": "MIT",
        "integrity": record.get("integrity"),
        "files": files,
    }
    (stage / "VERSION.json").write_text(json.dumps(info, indent=1) + "\n")
    # swapped in whole, so an interrupted run never leaves half a runtime
    old = out.with_name(".ort-old")
    if out.exists():
        os.replace(out, old)
    os.replace(stage, out)
    shutil.rmtree(old, ignore_errors=True)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default=VERSION, help=f"onnxruntime-web version ({VERSION})")
    args = parser.parse_args()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    info = vendor(args.version, OUT)
    total = sum(f.get("gzip_bytes", f["bytes"]) for f in info["files"].values())
    print(f"onnxruntime-web {info['version']} -> {OUT} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
