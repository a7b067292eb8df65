"""The HTTP benchmark's ``ours`` variant while the telemetry backend is down or hangs.

Three uvicorn processes serve the same instrumented app (upstream FastAPI instrumentation plus
this package), differing only in where OTLP goes:

- ``healthy``: the real collector (collector-config/otelcol.yaml, feeding Jaeger);
- ``stopped``: a free loopback port nothing listens on (connection refused);
- ``blackhole``: a TCP server on loopback that accepts connections, reads and discards what
  it gets and never answers (gRPC calls hang until the exporter's timeout).

Two phases, each in rounds that load every server in turn (rotated), bounded in time and count:

1. saturation (wrk, closed loop, fixed connections): throughput of each failing backend as a
   ratio of the healthy run (target: no worse than 5%). The latency measured there is reported
   but is not the target's figure: at saturation a request's latency is mostly queueing behind
   the others, and a variant that serves more requests per second (a failing backend does
   less export work) queues each of them more, so its latency is not comparable.
2. fixed rate (``_load.drive_rate``, open loop): every variant gets the same offered rate, half
   the healthy saturation throughput just measured (400 req/s with --quick); task latency
   p50/p99 (scheduling to task end, measured by the app) and request latency p50/p99 as ratios
   of the healthy run: the target's latency figure (no worse than 5%).

Also reported: RSS of each app at start, after the warm-up, after each round and at the end
(growth must stay within the exporters' queue limits: the span processor's 2048-span queue, not
the number of requests; ``backend_soak`` follows one app over a longer run), and that nothing
surfaced to the application: every response a 200, every request's task run (the app's own
counter), no task failures, while the app's log shows the exporters failing.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import threading
from typing import Any

from benchmarks._common import interleaved, median
from benchmarks.http_load import (
    collector,
    fixed_rate,
    fixed_rate_rounds,
    fixed_rate_rows,
    infra,
    load,
    start_app,
    stats,
    summarize,
    summarize_fixed_rate,
    workdir,
)

__all__ = ["SCENARIOS", "BlackHole", "run"]

SCENARIOS = ("healthy", "stopped", "blackhole")
# See http_load.FULL / QUICK for the fixed-rate keys.
FULL = {
    "rounds": 3,
    "duration": 6,
    "warmup": 3,
    "connections": 8,
    "rate_fraction": 0.5,
    "rate_duration": 4,
    "max_in_flight": 64,
}
QUICK = {
    "rounds": 1,
    "duration": 3,
    "warmup": 2,
    "connections": 8,
    "rate": 400,
    "rate_duration": 2.5,
    "max_in_flight": 64,
}
WITHIN = 0.05
_MAX_CONNECTIONS = 256


class BlackHole:
    """A loopback TCP server that accepts, reads and discards, and never answers."""

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="blackhole", daemon=True)
        self.accepted = 0
        self.bytes_swallowed = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        open_connections: list[socket.socket] = []
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.2):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._listener:
                        with contextlib.suppress(BlockingIOError):
                            conn, _ = sock.accept()
                            self.accepted += 1
                            if len(open_connections) >= _MAX_CONNECTIONS:
                                conn.close()
                                continue
                            conn.setblocking(False)
                            open_connections.append(conn)
                            selector.register(conn, selectors.EVENT_READ)
                        continue
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except ConnectionError:
                        data = b""  # reset by the client: close our end as well
                    if data:
                        self.bytes_swallowed += len(data)
                    else:
                        selector.unregister(sock)
                        open_connections.remove(sock)
                        sock.close()
        finally:
            for conn in open_connections:
                conn.close()
            selector.close()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()


def _export_errors(server: Any) -> int:
    """Lines of the app's log in which the SDK reports a failed or retried export."""
    markers = ("Failed to export", "Transient error", "exporting", "StatusCode.")
    return sum(
        1 for line in server.process.log_text().splitlines() if any(m in line for m in markers)
    )


def run(*, quick: bool = False, rounds: int | None = None, log: Any = print) -> dict[str, Any]:
    config = dict(QUICK if quick else FULL)
    if rounds is not None:
        config["rounds"] = rounds
    _infra = infra()
    work = workdir("backend_failing")
    samples: dict[str, list[dict[str, Any]]] = {s: [] for s in SCENARIOS}
    blackhole = BlackHole()
    blackhole.start()
    with contextlib.ExitStack() as stack, collector(work) as otelcol:
        stack.callback(blackhole.stop)
        endpoints = {
            "healthy": otelcol.otlp_grpc_endpoint,
            "stopped": f"http://127.0.0.1:{_infra.free_port()}",
            "blackhole": blackhole.endpoint,
        }
        servers = {}
        for scenario in SCENARIOS:
            server = start_app(work, f"bench-{scenario}", "ours", endpoints[scenario])
            stack.callback(server.stop)
            servers[scenario] = server
        memory: dict[str, dict[str, float]] = {}
        for scenario in SCENARIOS:
            load(servers[scenario], config, float(config["warmup"]))
            memory[scenario] = {"rss_start_mb": stats(servers[scenario])["rss_at_start_mb"]}
        for scenario in SCENARIOS:
            # The first reset of the measured rounds records RSS after the warm-up.
            servers[scenario].post("/reset")
            memory[scenario]["rss_after_warmup_mb"] = stats(servers[scenario])["rss_at_reset_mb"]
        for r, scenario in interleaved(SCENARIOS, int(config["rounds"])):
            result = load(servers[scenario], config, float(config["duration"]))
            samples[scenario].append(result)
            log(
                f"  backend_failing round {r + 1}: {scenario:<9} {result['rps']:8.0f} req/s  "
                f"task p50 {result['task_p50_ms']:.3f} ms  ok={result['all_ok']}"
            )
        # Latency at equal load: every backend gets half of what the healthy one sustains.
        rate = fixed_rate(config, median(r["rps"] for r in samples["healthy"]))
        basis = "fixed (--quick)" if config.get("rate") else f"{config['rate_fraction']} x healthy"
        fixed = fixed_rate_rounds(servers, config, rate, "backend_failing", log)
        for scenario in SCENARIOS:
            end = stats(servers[scenario])
            memory[scenario]["rss_end_mb"] = end["rss_mb"]
            memory[scenario]["growth_after_warmup_mb"] = (
                end["rss_mb"] - memory[scenario]["rss_after_warmup_mb"]
            )
            memory[scenario]["growth_from_start_mb"] = (
                end["rss_mb"] - memory[scenario]["rss_start_mb"]
            )
            memory[scenario]["export_errors_logged"] = _export_errors(servers[scenario])
            # A plateau here, not a slope, is what "bounded by the queue limits" means.
            memory[scenario]["rss_after_each_round_mb"] = [
                r["app"]["rss_mb"] for r in samples[scenario]
            ]
            memory[scenario]["rss_after_each_fixed_rate_round_mb"] = [
                r["app"]["rss_mb"] for r in fixed[scenario]
            ]
            memory[scenario]["span_queue_at_end"] = end.get("span_queue")
    figures = summarize(samples, "healthy", config)
    # At saturation: queueing-dominated, reported for reference, not the target's figure.
    figures["task_latency_ratio_at_saturation"] = figures.pop("task_latency_ratio")
    figures["fixed_rate"] = summarize_fixed_rate(fixed, "healthy", rate, basis)
    figures["memory"] = memory
    figures["blackhole"] = {
        "connections_accepted": blackhole.accepted,
        "bytes_swallowed": blackhole.bytes_swallowed,
    }
    figures["within_target"] = WITHIN
    # A failing backend may make the app faster (no export work); only slower counts.
    # Throughput at saturation; latency at the fixed rate (equal load).
    figures["meets_target"] = {
        **{
            f"throughput_{key}": value >= 1 - WITHIN
            for key, value in figures["throughput_ratio"].items()
        },
        **{
            f"task_latency_p50_{key}": value <= 1 + WITHIN
            for key, value in figures["fixed_rate"]["task_p50_ratio"].items()
        },
        **{
            f"task_latency_p99_{key}": value <= 1 + WITHIN
            for key, value in figures["fixed_rate"]["task_p99_ratio"].items()
        },
    }
    figures["no_error_surfaced"] = all(v["all_ok"] for v in figures["variants"].values()) and bool(
        figures["fixed_rate"]["all_ok"]
    )
    figures["span_queue_limit"] = int(os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE", "2048"))
    figures["growth_vs_healthy_mb"] = {
        s: memory[s]["growth_from_start_mb"] - memory["healthy"]["growth_from_start_mb"]
        for s in SCENARIOS
        if s != "healthy"
    }
    return figures


def table(figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for name, v in figures["variants"].items():
        mem = figures["memory"][name]
        rows.append(
            (
                f"backend {name}",
                f"{v['rps']:.0f} req/s, task p50 {v['task_p50_ms']:.3f} ms, "
                f"RSS {mem['rss_start_mb']:.0f}->{mem['rss_after_warmup_mb']:.0f}->"
                f"{mem['rss_end_mb']:.0f} MiB, export errors logged "
                f"{mem['export_errors_logged']}, ok={v['all_ok']}",
                "",
            )
        )
    for key, value in figures["throughput_ratio"].items():
        rows.append((f"backend {key} throughput", f"{value:.3f}", f">= {1 - WITHIN:.2f}"))
    for key, value in figures["task_latency_ratio_at_saturation"].items():
        rows.append(
            (f"backend {key} task latency p50 @ saturation", f"{value:.3f}", "(queueing; report)")
        )
    rows.extend(fixed_rate_rows("backend", figures["fixed_rate"], f"<= {1 + WITHIN:.2f}"))
    for key, value in figures["growth_vs_healthy_mb"].items():
        rows.append((f"backend {key} extra RSS vs healthy", f"{value:+.1f} MiB", "bounded"))
    rows.append(("backend no error surfaced", str(figures["no_error_surfaced"]), "True"))
    return rows


if __name__ == "__main__":
    print(json.dumps(run(quick=True), indent=2, default=str))
