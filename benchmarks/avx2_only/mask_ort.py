"""A copy of ONNX Runtime that sees an AVX2-only CPU, for CPUs without CPUID faulting.

ONNX Runtime has no setting that limits its kernels to AVX2: MLAS picks them from CPUID and
from XCR0, the register (read with XGETBV) saying which register files the OS saves. This copies
the interpreter's ``onnxruntime`` package and rewrites two kinds of instruction in its extension
modules, each replacement as long as what it replaces:

- each XGETBV (``0f 01 d0``) becomes ``lea eax, [rcx+7]`` (``8d 41 07``): every XGETBV reads
  XCR0, so ECX is 0 there and EAX becomes 7, "x87, SSE and AVX state only"; EDX keeps its value,
  and only XCR0's upper half (no feature bits) is built from it. A kernel set is used only where
  both CPUID and XCR0 allow it, so this hides AVX-512, AVX512-VNNI, AVX512-BF16 and AMX.
- each CPUID of leaf 7, sub-leaf 1 set up in place (``mov eax, 7; mov ecx, 1; cpuid``, 12
  bytes) becomes four ``xor``s and a ``nop``: all four registers read 0, as on an AMD Zen 2/3.
  That leaf holds AVX-VNNI and AVX-VNNI-INT8 (VEX instructions needing only AVX state, so the
  XCR0 answer leaves them visible), and MLAS reads it this way.

Other CPUID readers inside (the cpuinfo library, for core counts and the CPU's name) keep the
real answer. ``kernels.py`` beside it shows which kernels a run executes.

    python benchmarks/avx2_only/mask_ort.py CACHE_DIR   # patch this interpreter's copy, say where

``sitecustomize.py`` beside it does this in every Python process ``run`` starts.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

XGETBV = bytes.fromhex("0f01d0")
XCR0_AVX_ONLY = bytes.fromhex("8d4107")  # lea eax, [rcx+7]: XCR0 = x87 | SSE | AVX
LEAF7_1 = (bytes.fromhex("b807000000b901000000 0fa2"), bytes.fromhex("b901000000b807000000 0fa2"))
LEAF7_1_ZERO = bytes.fromhex("31c0 31db 31c9 31d2 0f1f4000")  # eax = ebx = ecx = edx = 0; nop
_INSN = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)[ \t]*(\S*)", re.M)
_SECTION = re.compile(
    r"^\s*\d+\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)", re.M
)


class PatchError(RuntimeError):
    """The package could not be patched; the message says why in one line."""


def sites(lib: Path) -> list[tuple[int, bytes, bytes]]:
    """``(file offset, bytes there, replacement)`` for each instruction to rewrite in ``lib``,
    found in ``objdump``'s disassembly (a byte search would also hit the same bytes inside
    other instructions and data)."""
    if shutil.which("objdump") is None:
        raise PatchError("objdump (binutils) is needed to find XGETBV and CPUID instructions")
    sections = [
        (int(vma, 16), int(size, 16), int(off, 16))
        for _, size, vma, off in _SECTION.findall(
            subprocess.run(
                ["objdump", "-h", str(lib)], capture_output=True, text=True, check=True
            ).stdout
        )
    ]

    def offset(address: int) -> int:
        for vma, size, off in sections:
            if vma <= address < vma + size:
                return address - vma + off
        raise PatchError(f"{lib.name}: instruction at {address:#x} is in no section")

    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(lib)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    insns = [(int(a, 16), m, ops) for a, m, ops in _INSN.findall(listing)]
    found = []
    for i, (address, mnemonic, _) in enumerate(insns):
        if mnemonic == "xgetbv":
            found.append((offset(address), XGETBV, XCR0_AVX_ONLY))
        elif mnemonic == "cpuid" and i >= 2:
            # the two moves just before it, in either order, at consecutive addresses
            setup = {(m, o) for _, m, o in insns[i - 2 : i]}
            if (
                setup == {("mov", "$0x7,%eax"), ("mov", "$0x1,%ecx")}
                and insns[i - 2][0] + 10 == address
            ):
                start = insns[i - 2][0]
                found.append((offset(start), None, LEAF7_1_ZERO))
    return found


def patch(lib: Path) -> dict[str, int]:
    """Rewrite ``lib`` in place (through a temporary file); returns how many instructions of
    each kind it rewrote."""
    data = bytearray(lib.read_bytes())
    counts = {"xgetbv": 0, "cpuid7.1": 0}
    for off, old, new in sites(lib):
        here = bytes(data[off : off + len(new)])
        if (old is not None and here != old) or (old is None and here not in LEAF7_1):
            raise PatchError(f"{lib.name}: unexpected bytes {here.hex()} at file offset {off:#x}")
        data[off : off + len(new)] = new
        counts["xgetbv" if old is not None else "cpuid7.1"] += 1
    tmp = lib.with_name(lib.name + ".tmp")
    tmp.write_bytes(bytes(data))
    tmp.chmod(lib.stat().st_mode)
    tmp.replace(lib)
    return counts


def patched_copy(package: Path, cache: Path) -> Path:
    """The folder holding a patched copy of the ``onnxruntime`` package at ``package``, made
    on first use (under a lock: ``run``'s commands start several interpreters at once)."""
    libs = sorted(package.glob("capi/*.so*"))
    key = hashlib.sha256(
        "".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}\n" for p in libs).encode()
        + Path(__file__).read_bytes()
    ).hexdigest()[:16]
    if (package / ".avx2-patched").exists():  # already the copy (under ``run``)
        return package.parent
    root = cache / key
    done = root / "onnxruntime" / ".avx2-patched"
    if done.exists():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return root
        work = cache / f"{key}.tmp"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(package, work / "onnxruntime", symlinks=True)
        try:
            counts = {
                lib.name: patch(work / "onnxruntime" / "capi" / lib.name)
                for lib in libs
                if lib.suffix == ".so" or ".so." in lib.name
            }
            if not any(c["xgetbv"] for c in counts.values()):
                raise PatchError(f"no XGETBV found in {package}/capi: nothing would be hidden")
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        (work / "onnxruntime" / ".avx2-patched").write_text(
            "".join(
                f"{name} " + " ".join(f"{k}={n}" for k, n in c.items()) + "\n"
                for name, c in counts.items()
            )
        )
        shutil.rmtree(root, ignore_errors=True)
        work.rename(root)
    return root


def installed_package() -> Path | None:
    """This interpreter's ``onnxruntime`` package folder, found without importing it."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: mask_ort.py CACHE_DIR", file=sys.stderr)
        return 2
    package = installed_package()
    if package is None:
        print("mask_ort: this interpreter has no onnxruntime", file=sys.stderr)
        return 2
    try:
        root = patched_copy(package, Path(sys.argv[1]).resolve())
    except (PatchError, OSError, subprocess.CalledProcessError) as e:
        print(f"mask_ort: {e}", file=sys.stderr)
        return 2
    print(root)
    print((root / "onnxruntime" / ".avx2-patched").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
