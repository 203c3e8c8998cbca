"""Slot assignment and KV bookkeeping, against a recording stand-in for
llama.cpp's sequence memory (the real one: tests/integration/test_batching.py)."""

from __future__ import annotations

from inference_server.domain import SessionKey
from inference_server.slots import Slot, SlotTable, common_prefix_length


class Memory:
    """Records what the table asks of llama.cpp's memory."""

    def __init__(self, n_sequences: int, *, cuts: bool = True) -> None:
        self.n_sequences = n_sequences
        self.cuts = cuts  # False: as a recurrent model, only whole sequences are dropped
        self.calls: list[tuple] = []

    def forget(self, sequence: int, from_position: int = 0) -> bool:
        self.calls.append(("forget", sequence, from_position))
        return self.cuts or from_position == 0

    def save_sequence(self, sequence: int) -> bytes:
        self.calls.append(("save", sequence))
        return bytes(100)

    def restore_sequence(self, sequence: int, state: bytes) -> bool:
        self.calls.append(("restore", sequence))
        return True


TENANT = "tenant"


def key(name: str) -> SessionKey:
    """A session of the tests' tenant."""
    return (TENANT, name)


def used(
    table: SlotTable, session: SessionKey | None, tokens: list[int], tenant: str = TENANT
) -> Slot:
    """A finished turn of ``session`` that left ``tokens`` in its slot."""
    slot = table.acquire(session, (), tenant)
    assert slot is not None
    slot.tokens = list(tokens)
    slot.busy = False
    return slot


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0


def test_a_session_gets_its_own_slot_back():
    table = SlotTable(Memory(2), saved_state_bytes=0)
    a = used(table, key("a"), [1, 2, 3])
    used(table, key("b"), [4])
    assert table.acquire(key("a")) is a


def test_empty_slots_go_first_then_the_least_recently_used():
    memory = Memory(2)
    table = SlotTable(memory, saved_state_bytes=0)
    a = used(table, key("a"), [1])
    b = used(table, key("b"), [2])
    assert a is not b
    used(table, key("a"), [1, 5])  # a is now the most recently used
    c = table.acquire(key("c"))
    assert c is b and c.session == key("c") and c.tokens == []
    assert ("forget", b.sequence, 0) in memory.calls


def test_no_slot_while_all_are_busy_and_a_busy_own_slot_waits():
    table = SlotTable(Memory(1), saved_state_bytes=0)
    assert table.acquire(key("a")) is not None
    assert table.acquire(key("b")) is None
    assert table.acquire(key("a")) is None


def test_reuse_keeps_the_common_prefix_and_always_evaluates_the_last_token():
    memory = Memory(1)
    table = SlotTable(memory, saved_state_bytes=0)
    slot = used(table, key("a"), [1, 2, 3, 4, 5])
    table.acquire(key("a"))
    assert table.reuse_prefix(slot, [1, 2, 3, 9, 9]) == 3
    assert slot.tokens == [1, 2, 3]
    assert memory.calls[-1] == ("forget", slot.sequence, 3)
    assert table.reuse_prefix(slot, [1, 2, 3]) == 2  # its logits start the reply
    assert slot.tokens == [1, 2]


def test_a_model_that_cannot_cut_a_sequence_short_evaluates_the_prompt_in_full():
    """llama_memory_seq_rm returns false for recurrent, hybrid and sliding-window
    models asked to drop part of a sequence: the whole sequence goes."""
    memory = Memory(1, cuts=False)
    table = SlotTable(memory, saved_state_bytes=0)
    slot = used(table, key("a"), [1, 2, 3, 4, 5])
    table.acquire(key("a"))
    assert table.reuse_prefix(slot, [1, 2, 3, 9, 9]) == 0
    assert slot.tokens == []
    assert memory.calls[-2:] == [("forget", 0, 3), ("forget", 0, 0)]
    slot.tokens = [1, 2, 3]
    assert table.reuse_prefix(slot, [1, 2, 3, 4]) == 3  # nothing to cut: all kept


def test_an_evicted_session_is_saved_then_restored_within_the_budget():
    memory = Memory(1)
    table = SlotTable(memory, saved_state_bytes=250)  # room for two states of 100 bytes
    used(table, key("a"), [1, 2])
    used(table, key("b"), [3])  # evicts a: saved
    used(table, key("c"), [4])  # evicts b: saved
    used(table, key("d"), [5])  # evicts c: saved, a (the oldest) dropped
    assert table.saved_sessions == [key("b"), key("c")]
    slot = table.acquire(key("b"))
    assert slot is not None and slot.tokens == [3]
    assert memory.calls[-1] == ("restore", slot.sequence)
    assert table.saved_sessions == [key("c"), key("d")]  # d left the slot for b
    slot.busy = False
    dropped = table.acquire(key("a"))
    assert dropped is not None and dropped.tokens == []  # dropped: evaluated again


def test_no_budget_saves_nothing():
    memory = Memory(1)
    table = SlotTable(memory, saved_state_bytes=0)
    used(table, key("a"), [1])
    used(table, key("b"), [2])
    assert table.saved_sessions == []
    assert not any(call[0] == "save" for call in memory.calls)


def test_forgetting_a_session_frees_its_slot_and_saved_state():
    memory = Memory(2)
    table = SlotTable(memory, saved_state_bytes=1000)
    a = used(table, key("a"), [1, 2])
    table.forget(key("a"))
    assert a.session is None and a.tokens == []
    used(table, key("b"), [3])
    used(table, key("c"), [4])
    used(table, key("d"), [5])  # evicts the least recently used of b and c: b
    table.forget(key("b"))
    assert table.saved_sessions == []


def anonymous(table: SlotTable, tokens: list[int]) -> Slot:
    """A finished job with no session that left ``tokens`` in its slot."""
    return used(table, None, tokens)


def test_a_job_finds_the_free_slot_whose_cells_begin_as_its_prompt():
    memory = Memory(3)
    table = SlotTable(memory, saved_state_bytes=0)
    first = anonymous(table, [1, 2, 3, 4, 5])
    other = anonymous(table, [1, 9])
    assert first is not other
    memory.calls.clear()
    # The next turn of the first conversation: its prompt extends those cells.
    slot = table.acquire(None, [1, 2, 3, 4, 5, 6, 7], TENANT)
    assert slot is first and slot.tokens == [1, 2, 3, 4, 5] and memory.calls == []
    assert table.reuse_prefix(slot, [1, 2, 3, 4, 5, 6, 7]) == 5
    slot.busy = False
    # A new session may start from them too (a shared system prompt), and
    # then holds the slot.
    taken = table.acquire(key("s"), [1, 2, 3, 8])
    assert taken is first and taken.session == key("s")


def test_a_short_shared_start_does_not_overwrite_another_conversation():
    table = SlotTable(Memory(2), saved_state_bytes=0)
    conversation = anonymous(table, [1, 2, 3, 4, 5, 6])
    # Only the template's first token in common: the empty slot is taken.
    slot = table.acquire(None, [1, 9, 9], TENANT)
    assert slot is not conversation and slot is not None and slot.tokens == []
    assert conversation.tokens == [1, 2, 3, 4, 5, 6]


def test_a_slot_a_session_holds_is_not_taken_for_its_prefix():
    table = SlotTable(Memory(2), saved_state_bytes=0)
    held = used(table, key("a"), [1, 2, 3])
    slot = table.acquire(None, [1, 2, 3, 4], TENANT)
    assert slot is not held and slot is not None and slot.tokens == []
    assert held.tokens == [1, 2, 3]


def test_without_a_shared_start_the_usual_choice_applies():
    memory = Memory(2)
    table = SlotTable(memory, saved_state_bytes=0)
    old = anonymous(table, [7, 7])
    slot = table.acquire(None, [1, 2], TENANT)
    assert slot is not old and slot is not None and slot.tokens == []  # the empty slot


def test_cells_of_one_tenant_are_never_shared_with_another():
    """Were they, a prompt's cached_tokens would tell another tenant what it began with."""
    memory = Memory(2)
    table = SlotTable(memory, saved_state_bytes=0)
    secret = anonymous(table, [1, 2, 3, 4, 5])
    other = table.acquire(None, [1, 2, 3, 4, 5, 6], "intruder")
    assert other is not secret and other is not None and other.tokens == []
    other.busy = False
    # The same prompt of the owner's tenant finds its cells.
    mine = table.acquire(None, [1, 2, 3, 4, 5, 6], TENANT)
    assert mine is secret and mine.tokens == [1, 2, 3, 4, 5]
    mine.busy = False
    # Taken by the intruder at last (least recently used), the slot is emptied first.
    table.acquire(None, [7], "intruder")
    taken = table.acquire(None, [8], "intruder")
    assert taken is secret and taken.tokens == [] and taken.tenant == "intruder"
