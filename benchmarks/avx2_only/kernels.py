"""Which vector instructions ONNX Runtime executes on a model here: a check of ``run``'s mask.

    python benchmarks/avx2_only/kernels.py MODEL.onnx [--samples 25]            # as it is
    benchmarks/avx2_only/run python benchmarks/avx2_only/kernels.py MODEL.onnx  # masked

Starts a child process that runs ``MODEL`` on random input in a loop (one thread, so the
samples land in its kernels, not in thread-pool waits), attaches ``gdb`` to it ``--samples``
times and reads the instruction each of its threads is at, then counts those that touch 512-bit
registers (``zmm``), 256-bit ones (``ymm``), and the int8 dot products: AVX-512/AVX-VNNI's
``vpdpbusd(s)`` and AVX2's ``vpmaddubsw``. Under the mask an int8 model should show
``vpmaddubsw`` and no ``zmm`` or ``vpdpbusd``; unmasked, on an AVX-512 VNNI CPU, the reverse.
Needs ``gdb`` and the right to attach to a child (ptrace).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter

from agegender.inference.runtime import cpu_info

_LOOP = """
import sys, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
i = s.get_inputs()[0]
shape = [d if isinstance(d, int) else 1 for d in i.shape]
rng = np.random.default_rng(0)
x = (rng.integers(0, 256, shape).astype(np.uint8) if "uint8" in i.type
     else rng.random(shape, dtype=np.float32))
print(ort.__file__, flush=True)
while True:
    s.run(None, {i.name: x})
"""
_KINDS = {
    "zmm": re.compile(r"%zmm"),
    "ymm": re.compile(r"%ymm"),
    "vpdpbusd": re.compile(r"\svpdpbusds?\s"),
    "vpmaddubsw": re.compile(r"\svpmaddubsw\s"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model")
    p.add_argument("--samples", type=int, default=25, help="gdb snapshots")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before the first")
    args = p.parse_args()
    if shutil.which("gdb") is None:
        print("kernels: needs gdb", file=sys.stderr)
        return 2
    child = subprocess.Popen(
        [sys.executable, "-c", _LOOP, args.model], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        ort_file = child.stdout.readline().strip()
        if not ort_file:
            print(f"kernels: the model loop did not start ({args.model})", file=sys.stderr)
            return 2
        time.sleep(args.warmup)
        at: list[str] = []
        for _ in range(args.samples):
            gdb = subprocess.run(
                ["gdb", "-p", str(child.pid), "-batch", "-ex", "thread apply all x/i $pc"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            at += [line for line in gdb.stdout.splitlines() if line.lstrip().startswith("=>")]
        if not at:
            print("kernels: gdb read no instruction (ptrace not allowed?)", file=sys.stderr)
            return 2
    finally:
        child.kill()
        child.wait()
    vector = [line for line in at if re.search(r"%[xyz]mm", line)]
    counts = Counter(k for line in vector for k, rx in _KINDS.items() if rx.search(line))
    mnemonics = Counter(m.group(1) for line in vector if (m := re.search(r":\s+(\w+)", line)))
    print(
        json.dumps(
            {
                "cpu": cpu_info()["name"],
                "cpuid_mask": os.environ.get("CPUID_MASK"),
                "model": args.model,
                "onnxruntime": ort_file,
                "samples": len(at),
                "in_vector_instructions": len(vector),
                **{k: counts.get(k, 0) for k in _KINDS},
                "most_common": dict(mnemonics.most_common(8)),
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
