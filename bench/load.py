"""``python -m bench.load``: a constant offered load on ``POST /chat``.

Starts the service (gRPC core and REST gateway, as ``make run`` does, its
sessions in memory unless ``--session-db``), warms it up with one request
per slot, then runs K clients at once for D seconds.
Each client keeps one session and loops ``POST /chat`` with a short message
at temperature 0 and a small ``max_tokens``; told 429, it waits the
``Retry-After`` seconds before asking again (``--ignore-retry-after``: it
asks again at once). The default K is twice the capacity the core admits
(``N_SLOTS + MAX_QUEUE``), so part of the load must be refused.

It reports the requests by HTTP status and the transport errors, the
concurrency held, throughput (completions/s, generated tokens/s), latency
p50/p95/p99 of the 200s (and of the 429s: how fast a refusal comes back), and
the resident memory (``VmRSS``) of the core and the gateway before, at the
peak of (sampled every second) and after the load. It prints a table and
writes ``bench/results/load.json``.

Concurrency held is measured from the client side, since the core has no API
that tells how many requests it holds: it is the largest number of requests
that ended 200 whose intervals (sent to answer received) overlap at one
instant. It counts the requests generating and those waiting for a slot (both
count against ``N_SLOTS + MAX_QUEUE``). An interval includes the gateway and
the loopback, so it can exceed the capacity by the few requests whose answer
was still on its way back while the core admitted the next.

Requests sent before the deadline are awaited. Rates are over the time from
the start of the load to the last 200 (``completions_span_s``; ``wall_s``
also waits for the last answer of any kind). A request not answered within
``--timeout`` counts as a transport error (``ReadTimeout``). The clients run
on the same machine as the service and take CPU from it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from inference_server.model_files import resolve_model_path

from .servers import Service, our_service

RESULTS = Path(__file__).resolve().parent / "results"
MESSAGE = "Say hello in one short sentence."
CORE_DEFAULT_SLOTS = 4
CORE_DEFAULT_MAX_QUEUE = 32
CORE_DEFAULT_N_CTX = 4096


@dataclass(frozen=True)
class Outcome:
    """One request: when it was sent and answered, and how it ended."""

    start: float
    end: float
    status: int | None
    """The HTTP status; ``None`` for a transport error."""
    tokens: int = 0
    error: str | None = None
    retry_after_s: float = 0.0

    @property
    def latency(self) -> float:
        return self.end - self.start


# --- shared with bench.soak --------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (as ``python -m bench`` computes it)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def latency_summary(values: list[float]) -> dict[str, float] | None:
    """p50/p95/p99 in seconds, or ``None`` without values."""
    if not values:
        return None
    return {f"p{q}_s": round(percentile(values, q), 4) for q in (50, 95, 99)}


def parse_env(pairs: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict (for ``--env``)."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--env wants KEY=VALUE, not {pair!r}")
        env[key] = value
    return env


def model_of(args: argparse.Namespace) -> Path:
    """``--model``, else ``MODEL_PATH``, else the default model."""
    return resolve_model_path(args.model or os.environ.get("MODEL_PATH"))


def service_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """A benchmark's command line: its docstring as help, and the service's options."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_service_arguments(parser)
    return parser


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that shape the service under test."""
    parser.add_argument("--model", help="GGUF file (default: MODEL_PATH, else the default model)")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="N_THREADS of the core (default: all CPUs, %(default)s)",
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=CORE_DEFAULT_SLOTS,
        help="N_SLOTS of the core (default %(default)s)",
    )
    parser.add_argument(
        "--n-ctx",
        type=int,
        default=CORE_DEFAULT_N_CTX,
        help="N_CTX of the core (default %(default)s)",
    )
    parser.add_argument(
        "--session-db",
        default=":memory:",
        help="SESSION_DB of the core (default %(default)s: nothing written to disk)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more environment for the core and the gateway (repeatable)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120,
        help="HTTP timeout (s, default %(default)s); a request past it counts as a "
        "transport error (ReadTimeout)",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="folder of the JSON report (default %(default)s)"
    )


def service_env(args: argparse.Namespace, **more: str) -> dict[str, str]:
    """The environment the scripts add for the service: ``SESSION_DB``, ``more``,
    then ``--env``."""
    return {"SESSION_DB": args.session_db, **more, **parse_env(args.env)}


def machine(args: argparse.Namespace, model: Path) -> dict:
    return {"cpus": os.cpu_count(), "threads": args.threads, "model": model.name}


def rss_of(service: Service) -> dict[str, float]:
    """Resident memory (MiB) of the core and the gateway, rounded."""
    return {name: round(mib, 1) for name, mib in service.rss_mib().items()}


def client_for(service: Service, connections: int, timeout: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=service.url, timeout=timeout, limits=limits)


async def post(http: httpx.AsyncClient, path: str, body: dict) -> Outcome:
    """One POST; its status (and ``tokens_used`` of a 200 from /chat), or the
    transport error."""
    start = time.perf_counter()
    try:
        reply = await http.post(path, json=body)
    except httpx.HTTPError as error:
        return Outcome(start, time.perf_counter(), None, error=type(error).__name__)
    end = time.perf_counter()
    tokens = reply.json().get("tokens_used", 0) if reply.status_code == 200 else 0
    retry = float(reply.headers.get("retry-after", 0)) if reply.status_code == 429 else 0.0
    return Outcome(start, end, reply.status_code, tokens, retry_after_s=retry)


def chat_body(session: str, max_tokens: int, message: str = MESSAGE) -> dict:
    return {
        "message": message,
        "session_id": session,
        "temperature": 0.0,
        "max_tokens": max_tokens,
    }


async def pool(items: list[str], concurrency: int, work: Callable[[str], Awaitable[None]]) -> None:
    """``work`` on every item, ``concurrency`` at a time, in order of the list."""
    queue = iter(items)

    async def worker() -> None:
        for item in queue:  # one iterator: each item goes to one worker
            await work(item)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def session_count(http: httpx.AsyncClient) -> int:
    reply = await http.get("/sessions")
    reply.raise_for_status()
    return reply.json()["count"]


async def warm_up(
    http: httpx.AsyncClient, requests: int, *, concurrency: int, max_tokens: int
) -> None:
    """``requests`` sessions of one turn, ``concurrency`` at a time, then cleared;
    a failure raises. ``concurrency`` at most N_SLOTS: none waits for a slot."""

    async def turn_and_clear(session: str) -> None:
        for path, body in (
            ("/chat", chat_body(session, max_tokens)),
            ("/chat/clear", {"session_id": session}),
        ):
            (await http.post(path, json=body)).raise_for_status()

    await pool([f"warmup-{uuid.uuid4()}" for _ in range(requests)], concurrency, turn_and_clear)


def count_statuses(outcomes: list[Outcome]) -> tuple[dict[str, int], dict[str, int]]:
    """Requests by HTTP status, and transport errors by exception name."""
    statuses = Counter(str(o.status) for o in outcomes if o.status is not None)
    errors = Counter(o.error for o in outcomes if o.error is not None)
    return dict(sorted(statuses.items())), dict(sorted(errors.items()))


# --- the load ----------------------------------------------------------------------


def max_overlap(outcomes: list[Outcome]) -> int:
    """The most intervals ``[start, end)`` open at one instant."""
    events = sorted([(o.start, 1) for o in outcomes] + [(o.end, -1) for o in outcomes])
    most = now = 0
    for _, step in events:  # at equal times the end (-1) sorts first
        now += step
        most = max(most, now)
    return most


async def load_client(
    http: httpx.AsyncClient,
    deadline: float,
    outcomes: list[Outcome],
    *,
    max_tokens: int,
    honor_retry_after: bool,
) -> None:
    """One client: its own session, one request after another until ``deadline``."""
    session = f"load-{uuid.uuid4()}"
    while time.perf_counter() < deadline:
        outcome = await post(http, "/chat", chat_body(session, max_tokens))
        outcomes.append(outcome)
        if outcome.status == 429 and honor_retry_after:
            await asyncio.sleep(outcome.retry_after_s)
        elif outcome.status is None:
            await asyncio.sleep(0.1)  # no tight loop on a refused connection


async def sample_rss(service: Service, peak: dict[str, float], stop: asyncio.Event) -> None:
    """Keep in ``peak`` the largest RSS of each process, sampled every second."""
    while not stop.is_set():
        for name, mib in rss_of(service).items():
            peak[name] = max(peak.get(name, 0.0), mib)
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except TimeoutError:
            pass


async def measure(service: Service, args: argparse.Namespace) -> dict:
    async with client_for(service, args.clients + 1, args.timeout) as http:
        await warm_up(http, args.slots, concurrency=args.slots, max_tokens=args.max_tokens)
        before = rss_of(service)
        outcomes: list[Outcome] = []
        peak: dict[str, float] = {}
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(service, peak, stop))
        started = time.perf_counter()
        deadline = started + args.duration
        await asyncio.gather(
            *(
                load_client(
                    http,
                    deadline,
                    outcomes,
                    max_tokens=args.max_tokens,
                    honor_retry_after=not args.ignore_retry_after,
                )
                for _ in range(args.clients)
            )
        )
        wall = time.perf_counter() - started
        stop.set()
        await sampler
        after = rss_of(service)
        sessions = await session_count(http)
    return summarize(
        outcomes, started, wall, before=before, peak=peak, after=after, sessions=sessions
    )


def summarize(
    outcomes: list[Outcome],
    started: float,
    wall: float,
    *,
    before: dict[str, float],
    peak: dict[str, float],
    after: dict[str, float],
    sessions: int,
) -> dict:
    ok = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 429]
    # Rates over the time answers came in: a request stuck until --timeout
    # (a transport error) does not stretch them.
    span = max((o.end for o in ok), default=started + wall) - started
    statuses, errors = count_statuses(outcomes)
    return {
        "requests": len(outcomes),
        "by_status": statuses,
        "transport_errors": errors,
        "concurrency_held": max_overlap(ok),
        "wall_s": round(wall, 2),
        "completions_span_s": round(span, 2),
        "completions_per_s": round(len(ok) / span, 2),
        "tokens_per_s": round(sum(o.tokens for o in ok) / span, 1),
        "latency_200": latency_summary([o.latency for o in ok]),
        "latency_429": latency_summary([o.latency for o in refused]),
        "rss_mib": {"before": before, "peak": peak, "after": after},
        "sessions_kept": sessions,
    }


def table(report: dict) -> str:
    result, settings = report["result"], report["settings"]
    by_status = result["by_status"]
    other = sum(n for code, n in by_status.items() if code not in ("200", "429"))
    lines = [
        "",
        f"Load: {settings['clients']} clients for {settings['duration_s']} s, "
        f"capacity {settings['capacity']} (N_SLOTS {settings['slots']} + "
        f"MAX_QUEUE {settings['max_queue']}), max_tokens {settings['max_tokens']}, "
        f"{report['machine']['threads']} threads on {report['machine']['cpus']} CPUs",
        f"  requests                 {result['requests']}",
        f"  200 / 429 / other        {by_status.get('200', 0)} / {by_status.get('429', 0)}"
        f" / {other}  {by_status if other else ''}".rstrip(),
        f"  transport errors         {sum(result['transport_errors'].values())}"
        f"  {result['transport_errors'] or ''}".rstrip(),
        f"  concurrency held (max)   {result['concurrency_held']}",
        f"  wall s (to the last 200) {result['wall_s']} ({result['completions_span_s']})",
        f"  completions/s            {result['completions_per_s']}",
        f"  tokens/s                 {result['tokens_per_s']}",
    ]
    for key in ("latency_200", "latency_429"):
        if (latency := result[key]) is not None:
            values = " / ".join(f"{latency[f'p{q}_s'] * 1000:.0f}" for q in (50, 95, 99))
            lines.append(f"  {key + ' p50/p95/p99':24} {values} ms")
    rss = result["rss_mib"]
    for name in ("core", "gateway"):
        lines.append(
            f"  RSS {name:8} MiB         before {rss['before'][name]:7.1f}  "
            f"peak {rss['peak'].get(name, 0.0):7.1f}  after {rss['after'][name]:7.1f}"
        )
    lines.append(f"  sessions kept            {result['sessions_kept']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = service_parser("python -m bench.load", __doc__)
    parser.add_argument(
        "--max-queue",
        type=int,
        default=CORE_DEFAULT_MAX_QUEUE,
        help="MAX_QUEUE of the core (default %(default)s)",
    )
    parser.add_argument(
        "--clients", type=int, help="concurrent clients (default: 2 x (slots + max queue))"
    )
    parser.add_argument(
        "--duration", type=float, default=60, help="seconds of load (default %(default)s)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=16, help="max_tokens per request (default %(default)s)"
    )
    parser.add_argument(
        "--ignore-retry-after",
        action="store_true",
        help="ask again at once after a 429 instead of waiting Retry-After",
    )
    args = parser.parse_args(argv)
    if args.clients is None:
        args.clients = 2 * (args.slots + args.max_queue)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = model_of(args)
    env = service_env(args, MAX_QUEUE=str(args.max_queue))
    report: dict = {
        "machine": machine(args, model),
        "settings": {
            "slots": args.slots,
            "max_queue": args.max_queue,
            "capacity": args.slots + args.max_queue,
            "n_ctx": args.n_ctx,
            "clients": args.clients,
            "duration_s": args.duration,
            "max_tokens": args.max_tokens,
            "message": MESSAGE,
            "honor_retry_after": not args.ignore_retry_after,
            "env": env,
        },
    }
    print(f"model {model.name}; starting the service ...", flush=True)
    with our_service(
        model, threads=args.threads, slots=args.slots, n_ctx=args.n_ctx, env=env
    ) as service:
        print(f"{args.clients} clients for {args.duration} s ...", flush=True)
        report["result"] = asyncio.run(measure(service, args))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "load.json"
    path.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
