"""The same echo task through Celery + Redis and through the realm, in one run.

Celery is what many Python projects reach for to spread work over machines;
this puts a number on the difference for small tasks.  Both sides run real
processes on this machine:

* **Celery 5 + Redis** (broker and result backend): a private ``redis-server``
  on a free port, one ``celery worker`` process (``--pool threads``, 16
  threads, the same 16 slots the realm's worker gets), and this process as the
  client: ``echo.delay(payload).get()`` from 1 or 16 threads.
* **M-TOR**: ``bench.dispatch``'s orchestrated phase (``RealmClient.call``
  through ``mtor orchestrator`` to one ``mtor node``), 1 and 16 in flight.

Needs ``redis-server`` (apt) and ``pip install 'celery[redis]'`` — neither is
a dependency of M-TOR; the benchmark says so and exits 2 without them.

    .venv/bin/python -m bench.celery_compare [--n 2000] [--n1 500]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

from bench import dispatch
from bench.common import emit, machine
from daemon.broker import PrivateBroker, free_port, port_open

PAYLOAD: Final = {"text": "hello realm", "n": 42}
THREADS: Final = 16
TASKS_MODULE: Final = """
from celery import Celery

app = Celery("mtorbench", broker="{url}", backend="{url}")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
)


@app.task
def echo(x):
    return x
"""


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", port):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def celery_worker(directory: Path, url: str) -> Iterator[Any]:
    (directory / "mtorbench_tasks.py").write_text(TASKS_MODULE.format(url=url))
    sys.path.insert(0, str(directory))
    import mtorbench_tasks  # type: ignore[import-not-found]

    proc = subprocess.Popen(
        [
            sys.executable, "-m", "celery", "-A", "mtorbench_tasks", "worker",
            "--pool", "threads", "--concurrency", str(THREADS),
            "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat",
        ],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:  # the worker is up when a task comes back
            try:
                mtorbench_tasks.echo.delay(1).get(timeout=2)
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
        yield mtorbench_tasks.echo
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
        if proc.poll() is None:
            proc.kill()


def drive_threads(call: Callable[[], Any], n: int, inflight: int) -> dict[str, Any]:
    latencies: list[float] = []

    def one(_i: int) -> None:
        t0 = time.perf_counter()
        call()
        latencies.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(inflight) as pool:
        list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "n": n,
        "inflight": inflight,
        "per_s": round(n / wall, 1),
        "p50_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 3),
    }


def measure_celery(args: argparse.Namespace) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="mtor-celery-") as tmp,
        redis_server() as url,
        celery_worker(Path(tmp), url) as echo,
    ):

        def call() -> Any:
            return echo.delay(PAYLOAD).get(timeout=30)

        drive_threads(call, 100, THREADS)  # warm-up
        one = drive_threads(call, args.n1, 1)
        many = drive_threads(call, args.n, THREADS)
    return {"inflight_1": one, f"inflight_{THREADS}": many}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="tasks with 16 in flight")
    parser.add_argument("--n1", type=int, default=500, help="tasks one at a time")
    args = parser.parse_args()
    missing = [
        what
        for what, ok in (
            ("redis-server (apt install redis-server)", shutil.which("redis-server")),
            ("celery (pip install 'celery[redis]')", importlib.util.find_spec("celery")),
        )
        if not ok
    ]
    if missing:
        print("bench.celery_compare needs: " + ", ".join(missing), file=sys.stderr)
        raise SystemExit(2)
    celery = measure_celery(args)
    realm_args = argparse.Namespace(
        n=args.n, n1=args.n1, inflight=THREADS, warmup=200, max_concurrency=64, profile=None
    )

    async def realm_run() -> dict[str, Any]:
        with PrivateBroker() as broker:
            return await dispatch.measure(broker, realm_args)

    realm = asyncio.run(realm_run())
    key = f"inflight_{THREADS}"
    mtor = realm["orchestrated"]
    emit(
        {
            "benchmark": "celery_compare",
            "machine": machine(),
            "celery_redis": celery,
            "mtor_orchestrated": {k: mtor[k] for k in ("inflight_1", key)},
            "mtor_direct_to_worker": realm["direct"],
            "ratio_mtor_over_celery": {
                "p50_inflight_1": round(
                    mtor["inflight_1"]["p50_ms"] / celery["inflight_1"]["p50_ms"], 3
                ),
                f"per_s_{key}": round(mtor[key]["per_s"] / celery[key]["per_s"], 3),
            },
        }
    )


if __name__ == "__main__":
    main()
