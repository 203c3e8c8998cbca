"""Which sequence slot a job gets, and what of its KV cache it can reuse.

A slot is one llama.cpp sequence. A session keeps its slot between turns, so
its next turn evaluates only the tokens its cached prefix lacks. When a job
needs a slot and none is free, the least recently used idle slot is taken;
its KV cells may be saved in RAM (up to a byte budget, least recently saved
dropped first) and restored when their session comes back. A job with no
slot of its own first looks for an idle slot that no session holds and whose
cells begin as its prompt does (a stateless completion's previous turn), among
the slots its own tenant used last: whether a prompt was cached must never
tell one tenant what another sent. A slot taken anew starts from the longest
start its prompt shares with the cells of another slot of the same tenant
(``_donor``: a copy of those cells, cut where the prompts part, as llama.cpp's
server reuses the slot most like the prompt), when that is longer than the
shared start and cheaper to copy than to evaluate. A slot that holds nothing
(taken anew, or emptied after a failure) gets the cells of the shared start
(``keep_shared_start``) when its prompt begins with those tokens: they come
from the server's settings, so they tell nobody anything.

Used only on the scheduler's thread.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .domain import SessionKey

log = logging.getLogger(__name__)

COPY_CELLS_PER_TOKEN_GAINED = 64
"""The most cells a donor may hold per token its copy saves evaluating (see
``SlotTable._donor``)."""


class SequenceMemory(Protocol):
    """The part of ``LlamaRuntime`` that slots manage."""

    n_sequences: int

    def forget(self, sequence: int, from_position: int = 0) -> bool: ...

    def save_sequence(self, sequence: int) -> bytearray: ...

    def restore_sequence(self, sequence: int, state: bytearray) -> bool: ...

    def copy_sequence(self, source: int, target: int) -> bool: ...


@dataclass(eq=False)
class Slot:
    """One sequence of the context and the tokens its KV cells hold (position i
    holds ``tokens[i]``)."""

    sequence: int
    tokens: list[int] = field(default_factory=list)
    session: SessionKey | None = None
    tenant: str | None = None
    """Whose tokens the cells hold (``None``: nobody's yet)."""
    busy: bool = False
    last_used: int = 0


@dataclass(frozen=True)
class _SavedState:
    tokens: list[int]
    state: bytearray


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class SlotTable:
    """The slots of one context, and the saved states of evicted sessions."""

    def __init__(self, memory: SequenceMemory, *, saved_state_bytes: int) -> None:
        self._memory = memory
        self.slots = [Slot(sequence) for sequence in range(memory.n_sequences)]
        self._saved: OrderedDict[SessionKey, _SavedState] = OrderedDict()
        self._saved_bytes = 0
        self._budget = saved_state_bytes
        self._clock = itertools.count(1)
        self._shared_start: _SavedState | None = None

    @property
    def saved_sessions(self) -> list[SessionKey]:
        return list(self._saved)

    def acquire(
        self, session: SessionKey | None, prompt: Sequence[int] = (), tenant: str | None = None
    ) -> Slot | None:
        """A slot for a job of ``session`` (``None``: none kept) and ``prompt``
        of ``tenant`` (a session's own tenant when it has one), marked busy;
        ``None`` when every slot is busy."""
        if session is not None:
            tenant = session[0]
        own = next((s for s in self.slots if session is not None and s.session == session), None)
        if own is not None:
            slot = None if own.busy else own
        elif (shared := self._sharing_prefix(session, prompt, tenant)) is not None:
            slot = shared
            slot.session = session
        else:
            idle = [s for s in self.slots if not s.busy]
            # Slots no session holds first, then the least recently used.
            slot = min(idle, key=lambda s: (s.session is not None, s.last_used), default=None)
            if slot is not None:
                # Taken out first, so that saving the evicted state cannot drop it.
                saved = self._take_saved(session)
                donor = None if saved is not None else self._donor(prompt, tenant, slot)
                if donor is slot:  # its own cells start the prompt: cut, not copied
                    self._save_evicted(slot)
                else:
                    self._evict(slot)  # empty now, whoever's cells they were
                    slot.tenant = tenant
                    if saved is not None:
                        self._restore(slot, session, saved)
                    elif donor is not None:
                        self._copy(donor, slot, session)
                slot.session = session
        if slot is not None:
            if not slot.tokens and (start := self._shared_start_of(prompt)) is not None:
                self._restore(slot, session, start)
            slot.busy = True
            slot.last_used = next(self._clock)
        return slot

    def _sharing_prefix(
        self, session: SessionKey | None, prompt: Sequence[int], tenant: str | None
    ) -> Slot | None:
        """The idle slot that no session holds whose cells begin the way
        ``prompt`` does, for at least half of them, longest shared start first
        (``None``: none does, or the session has a saved state to restore).

        A job without a session (a stateless completion, which resends its
        whole conversation) so finds the previous turn's cells without evicting
        a session; a new session may continue such a slot too. A shorter
        shared start (a chat template's first tokens) is not worth the cells
        it would overwrite: another conversation may still continue them.
        """
        if not prompt or (session is not None and session in self._saved):
            return None
        shared = {
            id(slot): common_prefix_length(slot.tokens, list(prompt))
            for slot in self.slots
            if not slot.busy and slot.session is None and slot.tokens and slot.tenant == tenant
        }
        worth = [s for s in self.slots if id(s) in shared and 2 * shared[id(s)] >= len(s.tokens)]
        return max(worth, key=lambda s: (shared[id(s)], s.last_used), default=None)

    def _donor(self, prompt: Sequence[int], tenant: str | None, taken: Slot) -> Slot | None:
        """The slot of ``tenant`` whose cells give the slot ``taken`` for
        ``prompt`` the longest start beyond the shared start, if copying them
        costs less than evaluating what they give (``None``: none does).

        A copy moves every cell of the donor: about 2 µs a cell on two CPU
        cores, where evaluating a token in a batch costs about 2 ms (so a copy
        there costs under a tenth of what it saves; on a GPU, where tokens
        are cheaper, about as much at worst). The taken slot's own cells cost
        nothing: they are only cut.
        """
        if not prompt:
            return None
        start = self._shared_start_of(prompt)
        given = len(start.tokens) if start is not None else 0
        wanted = list(prompt)
        best: tuple[int, int] | None = None
        donor = None
        for slot in self.slots:
            if not slot.tokens or slot.tenant != tenant:
                continue
            # Cut where reuse_prefix will cut: the prompt's last token is evaluated.
            gained = min(common_prefix_length(slot.tokens, wanted), len(wanted) - 1) - given
            cost = 0 if slot is taken else len(slot.tokens)
            if gained <= 0 or cost > COPY_CELLS_PER_TOKEN_GAINED * gained:
                continue
            if best is None or (gained, -cost) > best:
                best, donor = (gained, -cost), slot
        return donor

    def _copy(self, donor: Slot, slot: Slot, session: SessionKey | None) -> None:
        """``donor``'s cells into the empty ``slot`` (``reuse_prefix`` cuts them
        where the prompts part)."""
        if self._memory.copy_sequence(donor.sequence, slot.sequence):
            slot.tokens = list(donor.tokens)
        else:
            log.warning(
                "llama.cpp refused a copy of cells (for session %s): evaluated anew", session
            )
            self.invalidate(slot)

    def keep_shared_start(self, slot: Slot) -> None:
        """Keep a copy of ``slot``'s cells as the start of every new
        conversation whose prompt begins with its tokens; the slot is emptied."""
        self._shared_start = _SavedState(
            list(slot.tokens), self._memory.save_sequence(slot.sequence)
        )
        self.invalidate(slot)

    def _shared_start_of(self, prompt: Sequence[int]) -> _SavedState | None:
        """The shared start, if ``prompt`` begins with it."""
        start = self._shared_start
        if start is None or list(prompt[: len(start.tokens)]) != start.tokens:
            return None
        return start

    def reuse_prefix(self, slot: Slot, prompt: list[int]) -> int:
        """Keep the cached tokens that begin ``prompt`` and drop the rest;
        returns how many are kept. The prompt's last token is always evaluated
        again, since its logits give the first token of the reply. A model
        that cannot cut a sequence short (recurrent, hybrid, sliding-window)
        drops the whole sequence instead, and its prompt is evaluated in full."""
        kept = min(common_prefix_length(slot.tokens, prompt), len(prompt) - 1)
        if kept < len(slot.tokens):
            if not self._memory.forget(slot.sequence, kept):
                log.info("sequence %d cannot be cut at %d; evaluating it anew", slot.sequence, kept)
                self.invalidate(slot)
                return 0
            del slot.tokens[kept:]
        return kept

    def invalidate(self, slot: Slot) -> None:
        """Drop a slot's cells (after a failed decode their content is unknown)."""
        self._memory.forget(slot.sequence)
        slot.tokens.clear()

    def forget(self, session: SessionKey) -> None:
        """A session was cleared: its slot holds nothing worth keeping."""
        self._take_saved(session)
        for slot in self.slots:
            if slot.session == session:
                slot.session = None
                if not slot.busy:
                    self.invalidate(slot)

    def _evict(self, slot: Slot) -> None:
        self._save_evicted(slot)
        if slot.tokens:
            self.invalidate(slot)

    def _save_evicted(self, slot: Slot) -> None:
        """The slot's session loses it: its cells are saved within the budget."""
        if slot.session is not None and slot.tokens and self._budget > 0:
            self._save(slot.session, slot)
        slot.session = None

    def _save(self, session: SessionKey, slot: Slot) -> None:
        state = self._memory.save_sequence(slot.sequence)
        if len(state) > self._budget:
            return
        self._saved[session] = _SavedState(list(slot.tokens), state)
        self._saved_bytes += len(state)
        while self._saved_bytes > self._budget:
            _, dropped = self._saved.popitem(last=False)
            self._saved_bytes -= len(dropped.state)

    def _take_saved(self, session: SessionKey | None) -> _SavedState | None:
        saved = self._saved.pop(session, None) if session is not None else None
        if saved is not None:
            self._saved_bytes -= len(saved.state)
        return saved

    def _restore(self, slot: Slot, session: SessionKey | None, saved: _SavedState) -> None:
        if self._memory.restore_sequence(slot.sequence, saved.state):
            slot.tokens = list(saved.tokens)
        else:
            log.warning("llama.cpp refused a saved state (for session %s): evaluated anew", session)
            self.invalidate(slot)
