"""``python -m bench.soak``: many sessions created and cleared; errors and memory.

Starts the service (gRPC core and REST gateway, as ``make run`` does), warms
it up with a few requests (their sessions cleared), then:

1. creates N sessions (default 10,000), one ``POST /chat`` each (a short
   message, temperature 0, ``max_tokens`` 1), C at a time (default: as many
   as there are slots);
2. checks that ``GET /sessions`` counts N;
3. clears each with ``POST /chat/clear``, C at a time;
4. checks that ``GET /sessions`` counts 0 again.

The resident memory (``VmRSS``) of the core and of the gateway is sampled
after the warm-up, every ``--sample-every`` sessions created, after all were
created and after all were cleared. It reports the non-200 answers and
transport errors of each phase, its time and rate, the RSS series and the
growth (after all cleared minus after the warm-up). It prints a table, writes
``bench/results/soak.json``, and exits 1 if any request failed or sessions
were left.

The core gets ``SESSION_DB`` (``:memory:`` unless ``--session-db``): where
its session store keeps sessions (a core without one ignores it). A core that
keeps at most ``MAX_SESSIONS`` sessions must allow N of them, or the count
after creating is short (``--env MAX_SESSIONS=...``). Until a session's slot
is taken by another, the core keeps its KV cells, and then saves them in RAM
up to ``KV_CACHE_RAM_MIB``: part of the growth while creating is that cache,
which clearing empties.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from dataclasses import dataclass, field

import httpx

from .load import (
    Outcome,
    chat_body,
    client_for,
    count_statuses,
    latency_summary,
    machine,
    model_of,
    pool,
    post,
    rss_of,
    service_env,
    service_parser,
    session_count,
    warm_up,
)
from .servers import Service, our_service

MESSAGE = "Hi"


@dataclass
class Memory:
    """The RSS series of one run."""

    service: Service
    started: float = field(default_factory=time.perf_counter)
    samples: list[dict] = field(default_factory=list)

    def sample(self, label: str, created: int, cleared: int) -> None:
        self.samples.append(
            {
                "label": label,
                "elapsed_s": round(time.perf_counter() - self.started, 2),
                "created": created,
                "cleared": cleared,
                "rss_mib": rss_of(self.service),
            }
        )


def phase(outcomes: list[Outcome], elapsed: float) -> dict:
    """Statuses, transport errors, time, rate and latency of one phase."""
    statuses, errors = count_statuses(outcomes)
    return {
        "requests": len(outcomes),
        "by_status": statuses,
        "non_200": sum(n for code, n in statuses.items() if code != "200"),
        "transport_errors": errors,
        "elapsed_s": round(elapsed, 2),
        "per_s": round(len(outcomes) / elapsed, 1) if elapsed else None,
        "latency": latency_summary([o.latency for o in outcomes]),
    }


async def create_sessions(
    http: httpx.AsyncClient, ids: list[str], concurrency: int, memory: Memory, every: int
) -> dict:
    """One turn of ``max_tokens`` 1 per id; RSS sampled every ``every`` sessions."""
    outcomes: list[Outcome] = []

    async def create(session: str) -> None:
        outcomes.append(await post(http, "/chat", chat_body(session, 1, MESSAGE)))
        if len(outcomes) % every == 0:
            memory.sample(f"{len(outcomes)} created", len(outcomes), 0)
            print(f"  {len(outcomes)} created, RSS {memory.samples[-1]['rss_mib']}", flush=True)

    started = time.perf_counter()
    await pool(ids, concurrency, create)
    return phase(outcomes, time.perf_counter() - started)


async def clear_sessions(http: httpx.AsyncClient, ids: list[str], concurrency: int) -> dict:
    """``POST /chat/clear`` of each id."""
    outcomes: list[Outcome] = []

    async def clear(session: str) -> None:
        outcomes.append(await post(http, "/chat/clear", {"session_id": session}))

    started = time.perf_counter()
    await pool(ids, concurrency, clear)
    return phase(outcomes, time.perf_counter() - started)


def growth(memory: Memory) -> dict[str, dict[str, float]]:
    """RSS change (MiB) from the warm-up sample to the other milestones."""
    first = memory.samples[0]["rss_mib"]
    by_label = {s["label"]: s["rss_mib"] for s in memory.samples}
    return {
        label: {name: round(by_label[label][name] - first[name], 1) for name in first}
        for label in ("all created", "all cleared")
    }


async def measure(service: Service, args: argparse.Namespace) -> dict:
    ids = [f"soak-{uuid.uuid4()}" for _ in range(args.sessions)]
    async with client_for(service, max(args.concurrency, args.slots) + 1, args.timeout) as http:
        await warm_up(http, args.warmup, concurrency=args.slots, max_tokens=1)
        counts = {"after_warm_up": await session_count(http)}
        memory = Memory(service)
        memory.sample("warm-up", 0, 0)
        print(f"creating {args.sessions} sessions, {args.concurrency} at a time ...", flush=True)
        created = await create_sessions(http, ids, args.concurrency, memory, args.sample_every)
        memory.sample("all created", args.sessions, 0)
        counts["after_create"] = await session_count(http)
        print(f"clearing {args.sessions} sessions ...", flush=True)
        cleared = await clear_sessions(http, ids, args.concurrency)
        memory.sample("all cleared", args.sessions, args.sessions)
        counts["after_clear"] = await session_count(http)
    return {
        "create": created,
        "clear": cleared,
        "session_counts": counts,
        "rss_series": memory.samples,
        "rss_growth_mib": growth(memory),
        "kib_per_session_while_kept": {
            name: round(mib * 1024 / args.sessions, 2)
            for name, mib in growth(memory)["all created"].items()
        },
    }


def failures(result: dict, sessions: int) -> list[str]:
    """What went wrong, in words; empty when nothing did."""
    found = []
    for name in ("create", "clear"):
        errors = result[name]["transport_errors"]
        if result[name]["non_200"] or errors:
            found.append(f"{name}: {result[name]['by_status']} {errors or ''}".rstrip())
    counts = result["session_counts"]
    if counts["after_create"] != sessions + counts["after_warm_up"]:
        found.append(f"{counts['after_create']} sessions after creating {sessions}")
    if counts["after_clear"] != 0:
        found.append(f"{counts['after_clear']} sessions left after clearing")
    return found


def table(report: dict) -> str:
    result, settings = report["result"], report["settings"]
    lines = [
        "",
        f"Soak: {settings['sessions']} sessions, {settings['concurrency']} at a time, "
        f"N_SLOTS {settings['slots']}, SESSION_DB {settings['session_db']}, "
        f"{report['machine']['threads']} threads on {report['machine']['cpus']} CPUs",
    ]
    for name in ("create", "clear"):
        p = result[name]
        latency = p["latency"] or {}
        lines.append(
            f"  {name:6} {p['requests']:6} requests  {p['by_status']}  "
            f"transport errors {sum(p['transport_errors'].values())}  "
            f"{p['elapsed_s']} s  {p['per_s']}/s  "
            f"p50/p99 {latency.get('p50_s', 0) * 1000:.0f}/{latency.get('p99_s', 0) * 1000:.0f} ms"
        )
    counts = result["session_counts"]
    lines.append(
        f"  GET /sessions count: after warm-up {counts['after_warm_up']}, "
        f"after create {counts['after_create']}, after clear {counts['after_clear']}"
    )
    lines.append("  RSS MiB                  core  gateway")
    for sample in result["rss_series"]:
        rss = sample["rss_mib"]
        lines.append(f"    {sample['label']:20} {rss['core']:7.1f}  {rss['gateway']:7.1f}")
    for label, change in result["rss_growth_mib"].items():
        lines.append(
            f"  growth to {label:14} {change['core']:+7.1f}  {change['gateway']:+7.1f} MiB"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = service_parser("python -m bench.soak", __doc__)
    parser.add_argument(
        "--sessions", type=int, default=10_000, help="sessions to create (default %(default)s)"
    )
    parser.add_argument("--concurrency", type=int, help="clients at once (default: --slots)")
    parser.add_argument(
        "--sample-every",
        type=int,
        default=1000,
        help="sessions between RSS samples (default %(default)s)",
    )
    parser.add_argument(
        "--warmup", type=int, default=8, help="warm-up requests (default %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.concurrency is None:
        args.concurrency = args.slots
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = model_of(args)
    env = service_env(args)
    report: dict = {
        "machine": machine(args, model),
        "settings": {
            "sessions": args.sessions,
            "concurrency": args.concurrency,
            "slots": args.slots,
            "n_ctx": args.n_ctx,
            "warmup": args.warmup,
            "sample_every": args.sample_every,
            "session_db": args.session_db,
            "message": MESSAGE,
            "max_tokens": 1,
            "env": env,
        },
    }
    print(f"model {model.name}; starting the service ...", flush=True)
    started = time.perf_counter()
    with our_service(
        model, threads=args.threads, slots=args.slots, n_ctx=args.n_ctx, env=env
    ) as service:
        report["result"] = asyncio.run(measure(service, args))
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["failures"] = failures(report["result"], args.sessions)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "soak.json"
    path.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"\nwrote {path} ({report['wall_s']} s)")
    if report["failures"]:
        print("FAILED: " + "; ".join(report["failures"]))
        sys.exit(1)


if __name__ == "__main__":
    main()
