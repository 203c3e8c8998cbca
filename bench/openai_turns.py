"""``python -m bench.openai_turns``: KV-cache reuse for stateless conversations.

OpenAI's API keeps no state: a client sends the whole conversation at every
turn. This measures, in one run, what finding the previous turn's KV cells
saves (see ``slots.SlotTable``): each trial builds a conversation of
``--turns`` turns through ``/v1/chat/completions`` with the official
``openai`` SDK, then times one more turn with ``max_tokens`` 1 (prompt
evaluation dominates) twice: as the conversation's next turn (its cells are
found), and as the same conversation with its first message changed by one
character (nothing can be reused). It reports both medians and their ratio,
and writes ``bench/results/openai_turns.json``.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

from openai import OpenAI

from .load import machine, model_of, service_env, service_parser
from .servers import our_service


def timed_turn(client: OpenAI, model: str, messages: list[Any]) -> tuple[float, int, int]:
    """Seconds, prompt tokens and cached prompt tokens of a one-token reply."""
    started = time.perf_counter()
    reply = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=1
    )
    elapsed = time.perf_counter() - started
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    return elapsed, reply.usage.prompt_tokens, reply.usage.prompt_tokens_details.cached_tokens or 0


def conversation(client: OpenAI, model: str, trial: int, turns: int) -> list[Any]:
    messages: list[Any] = [
        {"role": "system", "content": f"Trial {trial}. You are a helpful assistant."}
    ]
    for turn in range(turns):
        messages.append(
            {"role": "user", "content": f"Tell me fact number {turn} about the history of Rome."}
        )
        reply = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=60
        )
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
    messages.append({"role": "user", "content": "Summarise."})
    return messages


def measure(url: str, trials: int, turns: int) -> dict[str, Any]:
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    runs = []
    for trial in range(trials):
        messages = conversation(client, model, trial, turns)
        reused = timed_turn(client, model, messages)
        changed = [{**messages[0], "content": "X" + messages[0]["content"][1:]}, *messages[1:]]
        cold = timed_turn(client, model, changed)
        runs.append({"reused": reused, "cold": cold})
        print(
            f"trial {trial}: next turn {reused[0] * 1000:.0f} ms "
            f"({reused[2]}/{reused[1]} cached), cold {cold[0] * 1000:.0f} ms "
            f"({cold[2]}/{cold[1]} cached)",
            flush=True,
        )
    reused_s = statistics.median(run["reused"][0] for run in runs)
    cold_s = statistics.median(run["cold"][0] for run in runs)
    return {
        "runs": runs,
        "median_next_turn_s": round(reused_s, 4),
        "median_cold_s": round(cold_s, 4),
        "cold_over_next_turn": round(cold_s / reused_s, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = service_parser("python -m bench.openai_turns", __doc__)
    parser.add_argument("--trials", type=int, default=5, help="conversations (default 5)")
    parser.add_argument("--turns", type=int, default=6, help="turns before the timed one")
    args = parser.parse_args(argv)
    model = model_of(args)
    with our_service(
        model, threads=args.threads, slots=args.slots, n_ctx=args.n_ctx, env=service_env(args)
    ) as service:
        result = measure(service.url, args.trials, args.turns)
    report = {"machine": machine(args, model), "turns": args.turns, "result": result}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "openai_turns.json"
    path.write_text(json.dumps(report, indent=2))
    print(
        f"median next turn {result['median_next_turn_s'] * 1000:.0f} ms, cold "
        f"{result['median_cold_s'] * 1000:.0f} ms: {result['cold_over_next_turn']}x\nwrote {path}"
    )


if __name__ == "__main__":
    main()
