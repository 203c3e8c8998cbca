"""``python -m bench.cluster`` (``make bench-cluster``): what replicas behind
one gateway give and cost, on this machine.

It starts PostgreSQL (fsync on, in a temporary directory), three cores on one
database, each pinned with ``taskset`` (CPUs of its own where there are more
CPUs than cores; else core i on CPU i mod n, one llama.cpp thread each) and,
for each measurement, a gateway in front of them:

1. Throughput: generated tokens/s in total at 1, 2 and 3 replicas (a gateway
   over the first r cores), under one offered load: C clients, each sending
   turns of new sessions (``max_tokens`` T) for D seconds.
2. Affinity: time to first token (TTFT) of turn 6 over turn 1, S sessions of
   6 turns interleaved, one request at a time, through a gateway with
   ``GRPC_LB_POLICY=ring_hash`` and one with ``round_robin``. S is prime to
   3, so that round robin does move a session's turns between replicas.
3. Failover: from ``kill -9`` of the replica holding the most of 12 sessions
   to each of its sessions' next successful turn (sent again at once on any
   error), and the same from ``SIGSTOP`` of one (which only the gateway's
   keepalive pings notice).
4. The store: ``PostgresSessionStore.append`` (one exchange of a new session,
   in one transaction committed with synchronous commit, as a turn commits)
   timed from the bench against the cluster's database while the 3-replica
   load runs, against the time of a turn (``POST /chat``) in that load.

A 2-CPU machine can show little of (1): with three cores on two CPUs, the
third shares a CPU with the first, and the gateway, PostgreSQL and the
clients take CPU from them all. It prints a table and writes
``bench/results/cluster.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from inference_server.domain import Exchange
from inference_server.postgres_sessions import PostgresSessionStore
from inference_server.sessions import RequestRecord, Retention

from .load import RESULTS, percentile
from .local_cluster import Child, LocalCluster, cpu_groups, usable_cpus, wait_serving
from .servers import free_port

REPLICAS = 3
TURN_MESSAGES = [
    "Tell me about the sea.",
    "And what lives in it?",
    "Which of them is the largest?",
    "What does it eat?",
    "Where can I see one?",
    "Thank you. What should I bring?",
]
HTTP_TIMEOUT_S = 300.0


def placement(cpus: list[int]) -> list[list[int]]:
    """The CPUs of each core: its own where there are enough, else CPU i mod n."""
    return cpu_groups(REPLICAS, cpus) or [[cpus[i % len(cpus)]] for i in range(REPLICAS)]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": ms(percentile(values, 50)), "p99_ms": ms(percentile(values, 99))}


def throughput(url: str, clients: int, seconds: float, max_tokens: int) -> dict[str, Any]:
    """``clients`` threads sending turns of new sessions for ``seconds``."""
    answers: list[tuple[float, float, int, int, str]] = []
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as http:
            turn = 0
            while time.monotonic() < deadline:
                turn += 1
                body = {
                    "message": TURN_MESSAGES[(index + turn) % len(TURN_MESSAGES)],
                    "temperature": 0,
                    "max_tokens": max_tokens,
                }
                start = time.perf_counter()
                reply = http.post("/chat", json=body)
                tokens = reply.json()["tokens_used"] if reply.status_code == 200 else 0
                replica = reply.headers.get("x-core-replica", "")
                answers.append((start, time.perf_counter(), reply.status_code, tokens, replica))

    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    span = max(end for _, end, *_ in answers) - min(start for start, *_ in answers)
    ok = [answer for answer in answers if answer[2] == 200]
    return {
        "tokens_per_s": round(sum(answer[3] for answer in ok) / span, 1),
        "turns": len(ok),
        "errors": len(answers) - len(ok),
        "turn_time": summary([end - start for start, end, *_ in ok]),
        "turns_per_replica": dict(collections.Counter(answer[4] for answer in ok)),
        "span_s": round(span, 1),
    }


def streamed_turn(http: httpx.Client, body: dict[str, Any]) -> tuple[float, str]:
    """TTFT of one streamed turn, and its session id."""
    start = time.perf_counter()
    first, session = 0.0, ""
    with http.stream("POST", "/chat/stream", json=body) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line.removeprefix("data: "))
            if "token" in event and not first:
                first = time.perf_counter()
            if "error" in event:
                raise RuntimeError(f"stream failed: {event['error']}")
            session = event.get("session_id", session)
    return first - start, session


def affinity(url: str, sessions: int, max_tokens: int) -> dict[str, Any]:
    """TTFT of each turn of ``sessions`` interleaved 6-turn sessions."""
    ids = [""] * sessions
    ttft: dict[int, list[float]] = {turn: [] for turn in range(1, len(TURN_MESSAGES) + 1)}
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as http:
        for turn, message in enumerate(TURN_MESSAGES, start=1):
            for index in range(sessions):
                body: dict[str, Any] = {
                    "message": message,
                    "temperature": 0,
                    "max_tokens": max_tokens,
                }
                if ids[index]:
                    body["session_id"] = ids[index]
                seconds, ids[index] = streamed_turn(http, body)
                ttft[turn].append(seconds)
    first, last = statistics.median(ttft[1]), statistics.median(ttft[len(TURN_MESSAGES)])
    return {
        "ttft_turn_1_ms": ms(first),
        "ttft_turn_6_ms": ms(last),
        "turn_6_over_turn_1": round(last / first, 2),
    }


def failover(
    cluster: LocalCluster, url: str, cores: list[Child], how: signal.Signals
) -> dict[str, Any]:
    """Place 12 sessions; send ``how`` to the core holding the most; time
    each of its sessions' next successful turn from that moment."""
    placed: dict[str, str] = {}
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as http:
        for index in range(12):
            body = {"message": f"Hello, I am number {index}.", "temperature": 0, "max_tokens": 4}
            reply = http.post("/chat", json=body)
            reply.raise_for_status()
            placed[reply.json()["session_id"]] = reply.headers["x-core-replica"]
    victim_name = collections.Counter(placed.values()).most_common(1)[0][0]
    victim = next(core for core in cores if core.name == victim_name)
    moved = [session for session, replica in placed.items() if replica == victim_name]
    times: list[float] = []
    errors = collections.Counter[str]()
    lock = threading.Lock()
    signalled = time.perf_counter()
    os.kill(victim.process.pid, how)

    def next_turn(session: str) -> None:
        body = {"message": "And now?", "session_id": session, "temperature": 0, "max_tokens": 4}
        with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as http:
            while True:
                reply = http.post("/chat", json=body)
                if reply.status_code == 200:
                    with lock:
                        times.append(time.perf_counter() - signalled)
                    return
                with lock:
                    errors[str(reply.status_code)] += 1

    threads = [threading.Thread(target=next_turn, args=(session,)) for session in moved]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if how == signal.SIGSTOP:
        os.kill(victim.process.pid, signal.SIGCONT)
    return {
        "replica": victim_name,
        "sessions": len(moved),
        "first_s": round(min(times), 3),
        "last_s": round(max(times), 3),
        "errors": dict(errors),
    }


def commit_latency(dsn: str, stop: threading.Event, pause_s: float = 0.05) -> list[float]:
    """Seconds of each ``append`` made until ``stop`` (each a new session)."""
    store = PostgresSessionStore(dsn, Retention(window=5, max_sessions=1_000_000, ttl_s=0))
    seconds = []
    try:
        while not stop.is_set():
            record = RequestRecord(uuid.uuid4().hex, "stop", 8)
            exchange = Exchange("How are you today?", "I am fine, thank you for asking.")
            start = time.perf_counter()
            store.append("bench", uuid.uuid4().hex, exchange, expected_version=0, request=record)
            seconds.append(time.perf_counter() - start)
            stop.wait(pause_s)
    finally:
        store.close()
    return seconds


def in_background(work: Callable[[], list[float]]) -> tuple[threading.Thread, list[list[float]]]:
    out: list[list[float]] = []
    thread = threading.Thread(target=lambda: out.append(work()))
    thread.start()
    return thread, out


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    cpus = usable_cpus()
    groups = placement(cpus)
    cluster = LocalCluster(root, env={"LOG_LEVEL": "WARNING", "N_SLOTS": str(args.slots)})
    try:
        cores = [
            cluster.start_core(f"core-{index}", free_port(), cpus=groups[index], wait=False)
            for index in range(REPLICAS)
        ]
        for core in cores:  # loading side by side
            wait_serving(core)
        report: dict[str, Any] = {
            "machine": {"cpus": len(cpus), "core_cpus": groups, "slots": args.slots},
            "load": {
                "clients": args.clients,
                "seconds": args.seconds,
                "max_tokens": args.max_tokens,
            },
            "throughput": {},
        }
        for replicas in range(1, REPLICAS + 1):
            gateway = cluster.start_gateway(free_port(), cores[:replicas], name=f"gw-{replicas}")
            url = f"http://127.0.0.1:{gateway.port}"
            throughput(url, replicas, 2, args.max_tokens)  # warm-up
            if replicas < REPLICAS:
                report["throughput"][replicas] = throughput(
                    url, args.clients, args.seconds, args.max_tokens
                )
            else:  # and the store's commits beside it
                done = threading.Event()
                committer, commits = in_background(partial(commit_latency, cluster.dsn, done))
                measured = throughput(url, args.clients, args.seconds, args.max_tokens)
                done.set()
                committer.join()
                report["throughput"][replicas] = measured
                report["store"] = {
                    "commit": summary(commits[0]),
                    "commits": len(commits[0]),
                    "turn": measured["turn_time"],
                }
            cluster.stop_gateway(gateway)
        report["affinity"] = {}
        for policy in ("ring_hash", "round_robin"):
            gateway = cluster.start_gateway(free_port(), cores, policy=policy, name=policy)
            url = f"http://127.0.0.1:{gateway.port}"
            report["affinity"][policy] = affinity(url, args.sessions, args.turn_tokens)
            cluster.stop_gateway(gateway)
        gateway = cluster.start_gateway(free_port(), cores, name="failover")
        url = f"http://127.0.0.1:{gateway.port}"
        report["failover"] = {"sigkill": failover(cluster, url, cores, signal.SIGKILL)}
        live = [core for core in cores if core.process.poll() is None]
        report["failover"]["sigstop"] = failover(cluster, url, live, signal.SIGSTOP)
        return report
    finally:
        cluster.close()


def table(report: dict[str, Any]) -> str:
    rows = []
    rates = [report["throughput"][replicas]["tokens_per_s"] for replicas in (1, 2, 3)]
    ratios = " / ".join(f"{rate / rates[0]:.2f}x" for rate in rates)
    rows.append(f"total tokens/s, 1 / 2 / 3 replicas | {' / '.join(map(str, rates))} ({ratios})")
    for policy, found in report["affinity"].items():
        rows.append(
            f"TTFT turn 1 / turn 6, {policy} (ms) | {found['ttft_turn_1_ms']} / "
            f"{found['ttft_turn_6_ms']} ({found['turn_6_over_turn_1']}x)"
        )
    for how, found in report["failover"].items():
        rows.append(
            f"{how} of {found['replica']} to its {found['sessions']} sessions' next turn (s) | "
            f"first {found['first_s']}, last {found['last_s']}, errors {found['errors'] or 0}"
        )
    store = report["store"]
    rows.append(
        f"store commit p50 / p99 (ms) | {store['commit']['p50_ms']} / {store['commit']['p99_ms']}"
    )
    rows.append(
        f"turn (POST /chat) p50 / p99 at 3 replicas (ms) | {store['turn']['p50_ms']} / "
        f"{store['turn']['p99_ms']}"
    )
    return "\n".join(f"| {row} |" for row in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="make bench-cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=12, help="clients of the throughput load")
    parser.add_argument("--seconds", type=float, default=20, help="seconds of each load")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of the load")
    parser.add_argument("--slots", type=int, default=4, help="N_SLOTS of each core")
    parser.add_argument("--sessions", type=int, default=4, help="sessions of the TTFT test")
    parser.add_argument("--turn-tokens", type=int, default=48, help="max_tokens of its turns")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of cluster.json")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="llamachat-bench-cluster-"))
    root.chmod(0o755)  # PostgreSQL runs as its own user where the bench runs as root
    try:
        report = run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cluster.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"written: {args.out / 'cluster.json'}")


if __name__ == "__main__":
    main()
