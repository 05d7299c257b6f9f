"""Statistics: counters and latency percentiles per capability, optional Prometheus."""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

from daemon.protocol.admin import OrchestratorStats

if TYPE_CHECKING:
    from daemon.orchestrator.registry import Peer

log = logging.getLogger(__name__)

RESERVOIR: Final = 1000  # latest durations kept per capability for percentiles


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[k], 3)


class Stats:
    def __init__(self) -> None:
        self.completed: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.durations: dict[str, deque[float]] = {}
        self._last_completed: Counter[str] = Counter()
        self._last_ts = time.monotonic()
        self._prom: dict[str, Any] | None = None

    def record(self, capability: str, outcome: str, total_ms: float) -> None:
        if outcome == "done":
            self.completed[capability] += 1
            self.durations.setdefault(capability, deque(maxlen=RESERVOIR)).append(total_ms)
        else:
            self.failed[capability] += 1
        if self._prom is not None:
            self._prom["tasks"].labels(capability, outcome).inc()
            self._prom["duration"].labels(capability).observe(total_ms / 1000)

    def throughput(self, *, reset: bool = False) -> dict[str, float]:
        """Completions per second since the last reset (the periodic stats window)."""
        now = time.monotonic()
        dt = max(1e-6, now - self._last_ts)
        out = {
            cap: round((n - self._last_completed[cap]) / dt, 2) for cap, n in self.completed.items()
        }
        if reset:
            self._last_completed = Counter(self.completed)
            self._last_ts = now
        return out

    def latency(self) -> dict[str, dict[str, float]]:
        out = {}
        for cap, values in self.durations.items():
            vals = list(values)
            out[cap] = {
                "p50": percentile(vals, 50),
                "p90": percentile(vals, 90),
                "p99": percentile(vals, 99),
            }
        return out

    def serve_prometheus(self, host: str, port: int) -> None:
        """Expose /metrics (prometheus-client's own HTTP thread)."""
        from prometheus_client import Counter as PCounter
        from prometheus_client import Gauge, Histogram, start_http_server

        self._prom = {
            "tasks": PCounter("mtor_tasks", "Tasks finished", ["capability", "outcome"]),
            "duration": Histogram(
                "mtor_task_duration_seconds",
                "Submit to final result",
                ["capability"],
                buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
            ),
            "queue": Gauge("mtor_queue_depth", "Queued tasks", ["capability"]),
            "peers": Gauge("mtor_peers_online", "Peers online"),
        }
        start_http_server(port, addr=host)
        log.info("Prometheus metrics on http://%s:%d/metrics", host, port)

    def gauges(self, queues: dict[str, int], peers_online: int) -> None:
        if self._prom is None:
            return
        for cap, depth in queues.items():
            self._prom["queue"].labels(cap).set(depth)
        self._prom["peers"].set(peers_online)

    def snapshot(
        self,
        peers: Iterable[Peer],
        queues: dict[str, int],
        running: Mapping[str, int],
        *,
        uptime_s: float,
        periodic: bool = False,
    ) -> OrchestratorStats:
        """The realm as ``orchestrator/stats`` and ``mtor admin stats`` show it;
        ``periodic``: the published one (throughput since the last)."""
        views = {}
        online = 0
        for p in peers:
            online += p.available
            views[p.node_id] = {
                "online": p.online and not p.stale,
                "drained": p.drained,
                "blacklisted": p.blacklisted,
                "slots": {
                    name: {
                        "in_use": s.in_use,
                        "capacity": s.capacity,
                        "latency_ms": round(s.latency_ms, 3) if s.latency_ms else None,
                        "success": round(s.success, 3),
                        "breaker": s.breaker.state,
                    }
                    for name, s in p.slots.items()
                },
            }
        self.gauges(queues, online)
        return OrchestratorStats(
            uptime_s=round(uptime_s, 1),
            peers_online=online,
            queues=queues,
            running=dict(running),
            completed=dict(self.completed),
            failed=dict(self.failed),
            throughput_per_s=self.throughput(reset=periodic),
            latency_ms=self.latency(),
            peers=views,
        )
