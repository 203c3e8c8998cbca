"""Many cores behind each gateway, as real processes: three cores (small
N_CTX and N_SLOTS) sharing one PostgreSQL session store, and two gateways in
front of all three (GRPC_ADDRESS is the list of the three).

Sessions stay on one replica (X-Core-Replica, and the core's own log), so
their later turns find their KV cache; a replica that freezes (SIGSTOP) or
dies (kill -9) loses its sessions to a neighbour, which answers them from the
shared store with no error for the client. The issue asks for 24 sessions x
3 turns; 12 x 3 (and 36 more one-turn sessions for the spread) keep the
module well under a minute.

What a fault must never do, each made to happen at a chosen moment rather
than left to timing: two turns of one session on two replicas, or a clear on
one during a turn on another, keep at most one history (the other turn:
ABORTED); a replica killed mid-stream keeps nothing of the turn, and one that
committed but died before its reply left answers the retry (same request id)
with the kept reply; PostgreSQL killed under load refuses with 503 only and
loses no acknowledged exchange, while the same check fails against a core
whose commits are asynchronous. The cluster has a PostgreSQL server of its
own, whose default is asynchronous commit with a lazy WAL writer: the store's
own ``synchronous_commit`` is what keeps the exchanges.
"""

from __future__ import annotations

import collections
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llamachat.v1 import chat_pb2, chat_pb2_grpc
from tests.e2e.cluster_faults import HoldingProxy, Load, Turn, lost, sse_events
from tests.e2e.conftest import stop
from tests.e2e.replica_cluster import (
    Cluster,
    Core,
    chat,
    kept,
    start_cluster,
    stub_of,
    wait_serving,
)
from tests.helpers import free_port
from tests.postgres_server import PostgresServer

# The cluster's PostgreSQL: asynchronous commit by default, and a WAL writer
# that writes every 10 s, so that what is committed with the server's default
# is lost by kill -9 for seconds. The store sets synchronous_commit itself.
ASYNCHRONOUS_SERVER = {"synchronous_commit": "off", "wal_writer_delay": "10s"}
# A turn whose reply is long (greedy, with the default model, after "My name
# is Ada." and its 4-token reply: 32 tokens and more): it is still generating
# when a test acts on its first piece of text.
LONG_TURN = "Count from one to thirty in words."
# Of the load on PostgreSQL: clients, and answers awaited at each step.
LOAD_CLIENTS = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with PostgresServer(settings=ASYNCHRONOUS_SERVER) as postgres:
        yield from start_cluster(postgres, tmp_path_factory.mktemp("replicas"))


def new_sessions(cluster: Cluster, count: int, max_tokens: int = 8) -> dict[str, str]:
    """``count`` new sessions (ids made by the gateways): id -> replica."""

    def one(index: int) -> tuple[str, str]:
        reply = chat(cluster.gateways[index % 2], f"Hello, I am number {index}.", None, max_tokens)
        return reply.json()["session_id"], reply.headers["x-core-replica"]

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(one, range(count)))


def test_every_turn_of_a_session_goes_to_the_replica_holding_its_cache(cluster: Cluster):
    placed = new_sessions(cluster, 12)

    def later_turns(session: str, gateway: int) -> list[str]:
        return [
            chat(cluster.gateways[(gateway + turn) % 2], text, session).headers["x-core-replica"]
            for turn, text in enumerate(["Tell me more.", "Thank you!"])
        ]

    with ThreadPoolExecutor(max_workers=4) as pool:
        answered = dict(zip(placed, pool.map(later_turns, placed, range(len(placed))), strict=True))
    for session, replica in placed.items():
        assert answered[session] == [replica, replica], session
        # The core's own log agrees, and turns 2 and 3 reused the session's cache.
        cached = cluster.core(replica).generations(session)
        assert len(cached) == 3 and cached[1] > 0 and cached[2] > 0, (session, cached)
        others = [core for core in cluster.cores if core.name != replica]
        assert not any(core.generations(session) for core in others)
    assert len(set(placed.values())) >= 2
    # Each replica gets a share of new sessions.
    spread = collections.Counter(new_sessions(cluster, 36, max_tokens=1).values())
    assert set(spread) == {core.name for core in cluster.cores}, spread


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_gather_every_replica_and_health_needs_one(cluster: Cluster):
    found = scrape(cluster.gateways[0])
    for core in cluster.cores:
        assert found[("llamachat:core_up", (("replica", core.name),))] == 1
        assert any(
            name == "llamachat:num_requests_running" and ("replica", core.name) in labels
            for name, labels in found
        )
    assert httpx.get(f"{cluster.gateways[1]}/health", timeout=30).status_code == 200


def test_a_frozen_replicas_sessions_go_to_a_neighbour_without_an_error(cluster: Cluster):
    placed = new_sessions(cluster, 9)
    frozen = collections.Counter(placed.values()).most_common(1)[0][0]
    process = cluster.core(frozen).process
    process.send_signal(signal.SIGSTOP)
    try:
        for index, (session, replica) in enumerate(placed.items()):
            reply = chat(cluster.gateways[index % 2], "And now?", session)
            if replica == frozen:
                assert reply.headers["x-core-replica"] != frozen
                # The neighbour answered from the shared store: both turns are kept.
                history = httpx.get(f"{cluster.gateways[0]}/sessions/{session}", timeout=30)
                assert len(history.json()["exchanges"]) == 2
            else:
                assert reply.headers["x-core-replica"] == replica
        fresh = new_sessions(cluster, 6, max_tokens=1)
        assert frozen not in fresh.values()
    finally:
        process.send_signal(signal.SIGCONT)
    wait_serving(cluster.core(frozen).port)
    # Both gateways route to it again (its sessions go back) before the next test.
    session = next(session for session, replica in placed.items() if replica == frozen)
    for url in cluster.gateways:
        while (
            httpx.get(f"{url}/sessions/{session}", timeout=30).headers["x-core-replica"] != frozen
        ):
            pass


@contextmanager
def frozen_after_first_piece(
    core: Core, stream: Iterator[chat_pb2.ChatStreamResponse]
) -> Iterator[None]:
    """Freeze ``core`` (SIGSTOP) once the first piece of ``stream``'s reply
    came: its turn has read the history and its version by then, and commits
    only after its last token. It goes on (SIGCONT) after the block."""
    assert next(stream).text
    core.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        core.process.send_signal(signal.SIGCONT)


def greedy(message: str, session: str, max_tokens: int = 4, **fields: str) -> dict[str, Any]:
    """Fields of a ChatRequest or a ChatStreamRequest at temperature 0."""
    return {
        "message": message,
        "session_id": session,
        "temperature": 0,
        "max_tokens": max_tokens,
        **fields,
    }


def test_two_turns_of_one_session_racing_on_two_replicas_keep_exactly_one(cluster: Cluster):
    one, other = cluster.live()[:2]
    session = f"race-{uuid.uuid4().hex[:8]}"
    with stub_of(one) as first, stub_of(other) as second:
        first.Chat(chat_pb2.ChatRequest(**greedy("My name is Ada.", session)), timeout=60)
        kept_before = kept(first, session)
        racing = second.ChatStream(
            chat_pb2.ChatStreamRequest(**greedy(LONG_TURN, session, 32)), timeout=60
        )
        with frozen_after_first_piece(other, racing):
            won = first.Chat(chat_pb2.ChatRequest(**greedy("Say hi.", session)), timeout=60)
        with pytest.raises(grpc.RpcError) as lost_race:
            list(racing)
        assert lost_race.value.code() == grpc.StatusCode.ABORTED
        assert "history changed" in str(lost_race.value.details())
        assert kept(second, session) == [*kept_before, ("Say hi.", won.text)]


def test_a_clear_on_one_replica_during_a_turn_on_another_keeps_nothing_of_the_turn(
    cluster: Cluster,
):
    one, other = cluster.live()[:2]
    session = f"clear-{uuid.uuid4().hex[:8]}"
    with stub_of(one) as first, stub_of(other) as second:
        first.Chat(chat_pb2.ChatRequest(**greedy("My name is Ada.", session)), timeout=60)
        turn = second.ChatStream(
            chat_pb2.ChatStreamRequest(**greedy(LONG_TURN, session, 32)), timeout=60
        )
        with frozen_after_first_piece(other, turn):
            first.Clear(chat_pb2.ClearRequest(session_id=session), timeout=60)
        with pytest.raises(grpc.RpcError) as cleared:
            list(turn)
        assert cleared.value.code() == grpc.StatusCode.ABORTED
        # The turn did not bring the cleared session back.
        assert kept(first, session) == kept(second, session) == []


def gateway_turn(url: str) -> Turn:
    def turn(session: str, request_id: str, message: str) -> tuple[int, str]:
        try:
            reply = httpx.post(
                f"{url}/chat",
                json=greedy(message, session),
                headers={"Idempotency-Key": request_id},
                timeout=60,
            )
        except httpx.TransportError:
            return 0, ""  # never expected: the gateways stay up
        return reply.status_code, reply.json()["response"] if reply.status_code == 200 else ""

    return turn


def core_turn(stub: chat_pb2_grpc.ChatServiceStub) -> Turn:
    def turn(session: str, request_id: str, message: str) -> tuple[int, str]:
        request = chat_pb2.ChatRequest(**greedy(message, session, request_id=request_id))
        try:
            return 200, stub.Chat(request, timeout=60).text
        except grpc.RpcError as error:
            return 503 if error.code() == grpc.StatusCode.UNAVAILABLE else 500, ""

    return turn


def test_postgresql_killed_under_load_refuses_with_503_only_and_loses_no_acknowledged_exchange(
    cluster: Cluster,
):
    """kill -9 of the server the store uses, while clients keep sending turns
    through both gateways; each refused turn is sent again with its request
    id. Every exchange acknowledged before, during and after is kept."""
    turns = [gateway_turn(url) for url in cluster.gateways]
    with Load(turns, LOAD_CLIENTS, "durable") as load:
        load.wait_until(lambda: len(load.acknowledged) >= LOAD_CLIENTS, "answers before")
        cluster.postgres.kill9()
        down = len(load.statuses)
        load.wait_until(lambda: load.statuses[down:].count(503) >= LOAD_CLIENTS, "refusals")
        cluster.postgres.start()
        up = len(load.acknowledged)
        load.wait_until(lambda: len(load.acknowledged) >= up + LOAD_CLIENTS, "answers after")
    assert set(load.statuses) <= {200, 503}, collections.Counter(load.statuses)
    with stub_of(cluster.live()[0]) as stub:
        assert lost(load.acknowledged, lambda session: kept(stub, session)) == []
    for core in cluster.live():  # every core's store is writable again
        wait_serving(core.port)


def test_the_same_check_finds_lost_exchanges_where_commits_are_asynchronous(cluster: Cluster):
    """The negative control of the test above: the same load, kill -9 and
    check, on a core whose store commits with synchronous_commit off
    (tests/e2e/asynchronous_core.py). PostgreSQL is killed as an exchange is
    acknowledged, well within its WAL writer's 10 s: that exchange is lost,
    and the check says so."""
    core = cluster.start_core("asynchronous", free_port(), "tests.e2e.asynchronous_core")
    try:
        with stub_of(core) as stub:
            with Load([core_turn(stub)], 2, "asynchronous") as load:
                load.wait_until(lambda: len(load.acknowledged) >= LOAD_CLIENTS, "answers")
                cluster.postgres.kill9()
            cluster.postgres.start()
            missing = lost(load.acknowledged, lambda session: kept(stub, session))
    finally:
        assert stop(core.process) == 0
    assert missing, "no acknowledged exchange was lost: the check could not fail"
    for live in cluster.live():
        wait_serving(live.port)


def test_a_replica_that_committed_but_died_before_replying_answers_a_retry_with_the_kept_reply(
    cluster: Cluster,
):
    """The core's reply is held back by a proxy (the core sends it, the client
    never gets it); once the exchange is committed (another replica reads it),
    the core is killed. The retry, with the same Idempotency-Key, is answered
    the kept reply, and the session keeps that one exchange."""
    placed = chat(cluster.gateways[0], "Hello, I am Ada.")
    session, victim = placed.json()["session_id"], cluster.core(placed.headers["x-core-replica"])
    neighbour = next(core for core in cluster.live() if core is not victim)
    key, message = uuid.uuid4().hex, "What is my name?"
    with (
        HoldingProxy(victim.port) as proxy,
        grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as channel,
        stub_of(neighbour) as other,
    ):
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        stub.GetModel(chat_pb2.GetModelRequest(), timeout=30)  # connected
        proxy.hold()
        call = stub.Chat.future(
            chat_pb2.ChatRequest(**greedy(message, session, request_id=key)), timeout=60
        )
        while len(stored := kept(other, session)) < 2:  # until the turn is committed
            time.sleep(0.01)
        victim.process.kill()
        victim.process.wait()
        with pytest.raises(grpc.RpcError) as unanswered:
            call.result()
        assert unanswered.value.code() == grpc.StatusCode.UNAVAILABLE
        # Sent again, hot enough that a second generation would differ.
        retry = httpx.post(
            f"{cluster.gateways[1]}/chat",
            json={**greedy(message, session), "temperature": 1.5},
            headers={"Idempotency-Key": key},
            timeout=60,
        )
        assert retry.status_code == 200, retry.text
        assert retry.headers["x-core-replica"] != victim.name
        assert stored[1] == (message, retry.json()["response"])
        assert kept(other, session) == stored
    # Started again on its address, it gets its sessions back at both gateways.
    cluster.restart(victim)
    for url in cluster.gateways:
        while httpx.get(f"{url}/sessions/{session}").headers["x-core-replica"] != victim.name:
            pass


def test_a_killed_replicas_sessions_keep_their_history_on_a_neighbour(cluster: Cluster):
    """Twin sessions (the same messages, greedy): one on the replica that is
    killed, one elsewhere; after kill -9 the moved twin's next reply equals
    the other's, so the neighbour had its whole history."""
    scrape(cluster.gateways[0])  # the gateway learns each replica's name
    placed: dict[str, str] = {}
    for index in range(9):  # one at a time: no batching, so greedy replies match
        reply = chat(cluster.gateways[index % 2], "Name three colours.", f"twin-{index}")
        placed[f"twin-{index}"] = reply.headers["x-core-replica"]
    killed = collections.Counter(placed.values()).most_common(1)[0][0]
    moved = next(session for session, replica in placed.items() if replica == killed)
    stayed = next(session for session, replica in placed.items() if replica != killed)
    victim = cluster.core(killed).process
    victim.kill()
    victim.wait()
    replies = {}
    for index, (session, replica) in enumerate(placed.items()):
        reply = chat(cluster.gateways[index % 2], "Which one is the warmest?", session)
        replies[session] = reply.json()["response"]
        answered = reply.headers["x-core-replica"]
        assert answered != killed if replica == killed else answered == replica
    assert replies[moved] == replies[stayed]
    assert httpx.get(f"{cluster.gateways[1]}/health", timeout=30).status_code == 200
    assert scrape(cluster.gateways[0])[("llamachat:core_up", (("replica", killed),))] == 0


def test_a_replica_killed_mid_stream_keeps_nothing_and_the_retry_is_kept_once_elsewhere(
    cluster: Cluster,
):
    """kill -9 of the core that streams a session's turn, after its first
    token: the SSE client gets an error event, the session keeps its history
    as it was, and the turn sent again with its Idempotency-Key is generated
    on another core and kept once (a second retry is answered the same)."""
    assert len(cluster.live()) >= 2
    placed = chat(cluster.gateways[0], "My name is Ada.", max_tokens=4)
    session, victim = placed.json()["session_id"], cluster.core(placed.headers["x-core-replica"])
    body, key = greedy(LONG_TURN, session, 32), {"Idempotency-Key": uuid.uuid4().hex}
    url = cluster.gateways[0]
    with httpx.stream("POST", f"{url}/chat/stream", json=body, headers=key, timeout=60) as stream:
        assert stream.headers["x-core-replica"] == victim.name
        events = sse_events(stream.iter_lines())
        assert "token" in next(events)
        victim.process.kill()
        victim.process.wait()
        rest = list(events)
    assert rest and "error" in rest[-1], rest
    assert not any("done" in event for event in rest), rest
    history = httpx.get(f"{url}/sessions/{session}", timeout=30).json()["exchanges"]
    assert len(history) == 1  # nothing of the killed turn
    retry = httpx.post(f"{cluster.gateways[1]}/chat", json=body, headers=key, timeout=60)
    assert retry.status_code == 200, retry.text
    assert retry.headers["x-core-replica"] != victim.name
    again = httpx.post(f"{url}/chat", json=body, headers=key, timeout=60)
    assert again.json() == retry.json()
    history = httpx.get(f"{url}/sessions/{session}", timeout=30).json()["exchanges"]
    assert history[1:] == [{"user": LONG_TURN, "assistant": retry.json()["response"]}]
    assert len(history) == 2
