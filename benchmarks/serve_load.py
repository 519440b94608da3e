"""Load test of ``agegender serve`` on loopback: fixed clients, fixed duration.

    python benchmarks/serve_load.py --data ../shared/data/UTKFace --clients 8 --seconds 20

Starts ``agegender serve`` in its own process on a free 127.0.0.1 port (so the clients do not
share its interpreter), waits for ``/health``, then runs ``--clients`` threads that each POST
aligned 200x200 faces (``aligned=true``; UTKFace JPEGs from ``--data``, or crops of the bundled
photo without it) back to back for ``--seconds``. Reports requests/s, p50/p90/p99 latency seen by
the clients, the server's median time per network batch (uploads that queue up go through
together) and every non-200 answer as an error.
Nothing but loopback is contacted. Prints JSON, then one Markdown table row.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

from agegender.inference.predictor import ASTRONAUT
from agegender.inference.runtime import cpu_class, cpu_info


def faces(data: str | None, n: int, seed: int) -> tuple[list[bytes], str]:
    """``n`` aligned face JPEGs and where they come from."""
    files = sorted(Path(data).glob("*.jpg")) if data and Path(data).is_dir() else []
    if files:
        pick = random.Random(seed).sample(files, min(n, len(files)))
        return [p.read_bytes() for p in pick], "UTKFace"
    photo = Image.open(ASTRONAUT).convert("RGB")
    out = []
    for i in range(n):  # slightly shifted crops of the one face
        dx, dy = (i * 7) % 30, (i * 11) % 30
        buf = io.BytesIO()
        photo.crop((140 + dx, 30 + dy, 340 + dx, 230 + dy)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out, "astronaut crops"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "agegender", "serve", "--port", str(port), "--model", args.model]
    cmd += ["--workers", str(args.workers), "--queue", str(args.queue)]
    if args.spin is not None:
        cmd.append("--spin" if args.spin else "--no-spin")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start in 120 s")


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default="../shared/data/UTKFace", help="aligned UTKFace JPEGs")
    ap.add_argument("--model", default="default")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds not counted")
    ap.add_argument("--workers", type=int, default=1, help="server inference threads")
    ap.add_argument("--queue", type=int, default=16, help="server queue (503 beyond)")
    ap.add_argument("--threads", type=int, default=2, help="the server's OpenMP threads")
    ap.add_argument(
        "--spin",
        action=argparse.BooleanOptionalAction,
        help="the server's --spin / --no-spin (without either: its default)",
    )
    ap.add_argument("--n", type=int, default=200, help="distinct faces to send")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the result to this file")
    args = ap.parse_args()

    bodies, source = faces(args.data, args.n, args.seed)
    port = free_port()
    server = start_server(port, args)
    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
    url = f"http://127.0.0.1:{port}/api/predict"
    latencies: list[float] = []
    server_ms: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    t_start = time.monotonic() + args.warmup
    t_end = t_start + args.seconds

    def client(k: int) -> None:
        i = k
        with httpx.Client(timeout=30) as http:
            while (now := time.monotonic()) < t_end:
                body = bodies[i % len(bodies)]
                i += args.clients
                t0 = time.perf_counter()
                try:
                    r = http.post(
                        url, files={"image": ("face.jpg", body)}, data={"aligned": "true"}
                    )
                    status = str(r.status_code)
                except httpx.HTTPError as e:
                    r, status = None, type(e).__name__
                dt = (time.perf_counter() - t0) * 1e3
                if now < t_start:
                    continue
                with lock:
                    if status == "200":
                        latencies.append(dt)
                        server_ms.append(r.json()["ms"])
                    else:
                        errors[status] = errors.get(status, 0) + 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.terminate()
        server.wait(10)
    done = len(latencies) + sum(errors.values())
    result = {
        "cpu": f"{cpu_info()['name']} ({cpu_class()}, {cpu_info()['cores']} cores)",
        "cpuid_mask": os.environ.get("CPUID_MASK"),
        "model_file": health.get("checkpoint"),
        "backend": health.get("backend"),
        "server_threads": args.threads,
        "workers": args.workers,
        "spin": health.get("spin", args.spin),
        "clients": args.clients,
        "seconds": args.seconds,
        "requests": done,
        "requests_per_s": round(done / args.seconds, 1),
        "p50_ms": round(percentile(latencies, 50), 1) if latencies else None,
        "p90_ms": round(percentile(latencies, 90), 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 99), 1) if latencies else None,
        "server_batch_median_ms": round(statistics.median(server_ms), 2) if server_ms else None,
        "errors": errors,
        "faces_from": source,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print("\n| clients | requests/s | p50 ms | p99 ms | server ms per batch | errors |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.clients} | {result['requests_per_s']} | {result['p50_ms']} | "
        f"{result['p99_ms']} | {result['server_batch_median_ms']} | {sum(errors.values())} |"
    )


if __name__ == "__main__":
    main()
