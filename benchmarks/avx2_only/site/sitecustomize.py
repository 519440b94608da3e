"""Started by ``benchmarks/avx2_only/run`` on a CPU without CPUID faulting: puts a copy of this
interpreter's ONNX Runtime that sees an AVX2-only CPU (``../mask_ort.py``) ahead of the real one,
in this process and in every Python process it starts (ours and the peer's, each with its own
ONNX Runtime). A run that cannot be masked stops here rather than measure the wrong kernels."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
try:
    import mask_ort

    _package = mask_ort.installed_package()
    if _package is not None:
        _copy = mask_ort.patched_copy(_package, Path(os.environ["AVX2_ONLY_CACHE"]))
        sys.path.insert(0, str(_copy))
except Exception as e:  # any failure means the run would not be masked
    print(f"avx2_only: cannot hide AVX-512 and AVX-VNNI from ONNX Runtime: {e}", file=sys.stderr)
    os._exit(2)
finally:
    del sys.path[sys.path.index(str(Path(__file__).resolve().parent.parent))]
