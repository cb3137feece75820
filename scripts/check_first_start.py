"""A newcomer's first start, as CI checks it: ``make serve`` on an empty model cache, then again on the full one.

Run after ``make setup`` and nothing else (standard library only, so it needs none of the test
extras). It points ``LORASERVE_CACHE_DIR`` at a new empty directory, starts ``make serve`` (the
README's first command) on a free loopback port, waits for ``/health``, sends one ``/generate``
with the demo adapter ``shout`` and checks the answer is non-empty text, stops the server with
SIGINT (Ctrl+C), and does it all again from the now-filled cache. It prints both start times and
exits 1, with the server's output, when anything fails. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            return res.status, res.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start_once(cache: Path, start_timeout: float, log: Path) -> float:
    """Start ``make serve``, wait for /health, check one adapter answer, stop it; the seconds to /health."""
    port = free_port()
    env = {**os.environ, "LORASERVE_CACHE_DIR": str(cache)}
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "serve", f"ARGS=--port {port}"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    start, url = time.monotonic(), f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode} before answering /health")
            if time.monotonic() - start > start_timeout:
                raise RuntimeError(f"/health did not answer within {start_timeout:.0f} s")
            try:
                if http(f"{url}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        ready = time.monotonic() - start
        body = {
            "text": "Name a city.",
            "sampling_params": {"max_new_tokens": 16, "temperature": 0},
            "lora_path": "shout",
        }
        status, raw = http(f"{url}/generate", body, timeout=120)
        text = json.loads(raw).get("text") if status == 200 else None
        if not isinstance(text, str) or not text.strip():
            raise RuntimeError(f"/generate with adapter 'shout' answered {status}: {raw[:500]!r}")
        print(f"  /generate with adapter 'shout': {text.strip()[:60]!r}")
        return ready
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl+C, as a person stops it
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start-timeout", type=float, default=600.0, help="seconds a start may take (default 600)")
    args = parser.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="loraserve-empty-cache-"))
    log = cache.parent / f"{cache.name}.log"
    times = []
    try:
        for label in ("empty cache", "filled cache"):
            print(f"make serve with LORASERVE_CACHE_DIR={cache} ({label})", flush=True)
            times.append(start_once(cache, args.start_timeout, log))
            print(f"  ready after {times[-1]:.1f} s", flush=True)
    except RuntimeError as exc:
        print(f"first start failed: {exc}\n--- server output ---\n{log.read_text()[-6000:]}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # the converted model is ~540 MB
        log.unlink(missing_ok=True)
    print(f"start times: empty cache {times[0]:.1f} s (converts the embedded model), filled cache {times[1]:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
