"""Slot assignment and KV bookkeeping, against a recording stand-in for
llama.cpp's sequence memory (the real one: tests/integration/test_batching.py)."""

from __future__ import annotations

from inference_server.domain import SessionKey
from inference_server.slots import (
    COPY_CELLS_PER_TOKEN_GAINED,
    Slot,
    SlotTable,
    common_prefix_length,
)


class Memory:
    """Records what the table asks of llama.cpp's memory."""

    def __init__(self, n_sequences: int, *, cuts: bool = True, copies: bool = True) -> None:
        self.n_sequences = n_sequences
        self.cuts = cuts  # False: as a recurrent model, only whole sequences are dropped
        self.copies = copies
        self.calls: list[tuple] = []

    def forget(self, sequence: int, from_position: int = 0) -> bool:
        self.calls.append(("forget", sequence, from_position))
        return self.cuts or from_position == 0

    def save_sequence(self, sequence: int) -> bytearray:
        self.calls.append(("save", sequence))
        return bytearray(100)

    def restore_sequence(self, sequence: int, state: bytearray) -> bool:
        self.calls.append(("restore", sequence))
        return True

    def copy_sequence(self, source: int, target: int) -> bool:
        self.calls.append(("copy", source, target))
        return self.copies


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
    memory = Memory(2)
    table = SlotTable(memory, saved_state_bytes=0)
    conversation = anonymous(table, [1, 2, 3, 4, 5, 6])
    # Only the template's first token in common: the empty slot is taken, and
    # gets a copy of the conversation's cells (cut later by reuse_prefix).
    slot = table.acquire(None, [1, 9, 9], TENANT)
    assert slot is not conversation and slot is not None
    assert memory.calls[-1] == ("copy", conversation.sequence, slot.sequence)
    assert slot.tokens == [1, 2, 3, 4, 5, 6] and table.reuse_prefix(slot, [1, 9, 9]) == 1
    assert conversation.tokens == [1, 2, 3, 4, 5, 6]


def test_a_slot_a_session_holds_is_not_taken_for_its_prefix_but_copied():
    table = SlotTable(Memory(2), saved_state_bytes=0)
    held = used(table, key("a"), [1, 2, 3])
    slot = table.acquire(None, [1, 2, 3, 4], TENANT)
    assert slot is not held and slot is not None and slot.tokens == [1, 2, 3]
    assert held.tokens == [1, 2, 3] and held.session == key("a")


def test_the_longest_start_is_copied_only_where_cheaper_than_evaluating_it():
    memory = Memory(3)
    table = SlotTable(memory, saved_state_bytes=0)
    short = used(table, key("a"), [1, 2, 3])
    # Five tokens in common, but more cells than five tokens are worth.
    long = used(table, key("b"), [1, 2, 3, 4, 5] + [0] * (COPY_CELLS_PER_TOKEN_GAINED * 5))
    slot = table.acquire(key("c"), [1, 2, 3, 4, 5, 6])
    assert slot is not None and slot not in (short, long)
    assert slot.tokens == short.tokens  # the cheaper donor
    assert long.tokens[:5] == [1, 2, 3, 4, 5] and long.session == key("b")


def test_a_taken_slot_whose_own_cells_start_the_prompt_keeps_them():
    memory = Memory(1)
    table = SlotTable(memory, saved_state_bytes=1000)
    used(table, key("a"), [1, 2, 3, 4, 5])
    memory.calls.clear()
    slot = table.acquire(key("b"), [1, 2, 3, 9])
    assert slot is not None and slot.session == key("b")
    assert memory.calls == [("save", slot.sequence)]  # a's state kept, no copy, no forget
    assert table.reuse_prefix(slot, [1, 2, 3, 9]) == 3
    assert table.saved_sessions == [key("a")]


def test_a_donor_is_not_used_where_the_shared_start_gives_as_much():
    memory = Memory(2)
    table = SlotTable(memory, saved_state_bytes=0)
    start = table.acquire(None, [1, 2, 3], TENANT)
    assert start is not None
    start.tokens = [1, 2, 3]
    table.keep_shared_start(start)
    start.busy = False
    conversation = used(table, key("a"), [1, 2, 3, 4, 5])
    memory.calls.clear()
    slot = table.acquire(key("b"), [1, 2, 3, 7])
    assert slot is not None and slot is not conversation
    assert [call[0] for call in memory.calls] == ["restore"]  # the shared start only
    assert slot.tokens == [1, 2, 3]


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


def test_a_refused_copy_leaves_the_slot_empty():
    memory = Memory(2, copies=False)
    table = SlotTable(memory, saved_state_bytes=0)
    used(table, key("a"), [1, 2, 3])
    slot = table.acquire(key("b"), [1, 2, 3, 4])
    assert slot is not None and slot.tokens == []
    assert memory.calls[-2:] == [("copy", 0, slot.sequence), ("forget", slot.sequence, 0)]
