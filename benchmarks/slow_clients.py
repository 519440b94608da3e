"""The service under slow-body clients: does ``/health`` keep answering, and do the logs stay
bounded?

    python benchmarks/slow_clients.py [--clients 1100 --fd-limit 1024 --seconds 30]

Starts ``agegender serve`` on a free loopback port with its open-file limit at ``--fd-limit``,
then opens ``--clients`` connections that each send complete headers (``Content-Length:
1000000``) and then one body byte every 5 s, and meanwhile times a ``GET /health`` every
second. Prints the health latencies (median, max), how many health probes failed, the
connections the service refused or cut, and the bytes the service logged. Loopback only,
bounded in clients and time; the server and every socket are closed at the end.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port: int, fd_limit: int, log) -> subprocess.Popen:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    cmd = [sys.executable, "-m", "agegender", "serve", "--port", str(port), "--threads", "2"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, preexec_fn=limit)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the service did not start")


def slow_client(port: int) -> socket.socket | None:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
        s.sendall(
            b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            b"multipart/form-data; boundary=x\r\nContent-Length: 1000000\r\n\r\n"
        )
        s.setblocking(False)
        return s
    except OSError:
        return None


def health(port: int) -> float | None:
    t0 = time.perf_counter()
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
    except OSError:
        return None
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1100)
    p.add_argument("--fd-limit", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=30.0)
    a = p.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, a.clients + 256), hard))
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = start(port, a.fd_limit, log)
        socks, latencies, failed, cut = [], [], 0, 0
        try:
            socks = [s for s in (slow_client(port) for _ in range(a.clients)) if s]
            end = time.monotonic() + a.seconds
            next_byte = time.monotonic() + 5
            while time.monotonic() < end:
                t = health(port)
                latencies.append(t) if t is not None else None
                failed += t is None
                if time.monotonic() >= next_byte:
                    next_byte += 5
                    for s in socks:
                        try:
                            s.send(b"-")
                        except OSError:
                            cut += 1
                time.sleep(max(0.0, 1 - (t or 0)))
        finally:
            for s in socks:
                s.close()
            proc.terminate()
            proc.wait(10)
        log.seek(0, 2)
        logged = log.tell()
        log.seek(0)
        lines = log.read().decode(errors="replace").splitlines()
    out = {
        "clients_connected": len(socks),
        "health_probes": len(latencies) + failed,
        "health_failed": failed,
        "health_median_s": round(statistics.median(latencies), 3) if latencies else None,
        "health_max_s": round(max(latencies), 3) if latencies else None,
        "sends_refused": cut,
        "log_bytes": logged,
        "log_lines": len(lines),
        "log_sample": sorted(set(lines))[:6],
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
