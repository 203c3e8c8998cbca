"""A scripted ``Runtime`` with no model, for the scheduler's unit tests.

Each job's sampler replies with ``reply`` tokens, then the end-of-generation
token; token ``t`` stands for the text ``pieces[t]`` (``"<t>"`` unless given).
Every batch is checked as llama.cpp would (at most ``n_batch`` tokens, each
sequence's positions following on from its cells) and recorded. The failures
llama.cpp can report are switched on per test: ``no_room`` (``llama_decode``
returning 1), ``cuts`` (``llama_memory_seq_rm`` refusing a partial cut), ``restores``
(``llama_state_seq_set_data`` refusing a saved state) and
``sample_error`` (an unexpected error on the scheduler's thread).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from inference_server.domain import Sampling, TokenLogprob, TopLogprob
from inference_server.runtime import BatchEntry, NoKvSlot, TokenSampler

END = 0


class ScriptedSampler:
    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.closed = False

    def next_token(self) -> int:
        return self.tokens.pop(0) if self.tokens else END

    def close(self) -> None:
        self.closed = True


class ScriptedRuntime:
    def __init__(
        self,
        *,
        n_sequences: int = 2,
        n_ctx: int = 64,
        n_batch: int = 16,
        reply: Sequence[int] = (10, 11, 12),
        pieces: dict[int, bytes] | None = None,
    ) -> None:
        self.n_sequences = n_sequences
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.reply = list(reply)
        self.pieces = pieces or {}
        self.cells: dict[int, int] = dict.fromkeys(range(n_sequences), 0)
        self.batches: list[list[BatchEntry]] = []
        self.samplers: list[ScriptedSampler] = []
        self.no_room: Callable[[Sequence[BatchEntry]], bool] = lambda entries: False
        self.cuts = True
        self.restores = True
        self.sample_error: Exception | None = None
        self.closed = False

    def sampler(self, sampling: Sampling) -> ScriptedSampler:
        sampler = ScriptedSampler(list(self.reply))
        self.samplers.append(sampler)
        return sampler

    def decode(self, entries: Sequence[BatchEntry]) -> None:
        assert 0 < len(entries) <= self.n_batch
        if self.no_room(entries):
            raise NoKvSlot("no room in the KV cache (scripted)")
        for entry in entries:
            assert entry.position == self.cells[entry.sequence], "a gap in a sequence"
            self.cells[entry.sequence] += 1
        self.batches.append(list(entries))

    def sample(self, sampler: TokenSampler, batch_index: int) -> int:
        assert self.batches[-1][batch_index].wants_logits
        if self.sample_error is not None:
            raise self.sample_error
        assert isinstance(sampler, ScriptedSampler)  # made by self.sampler
        return sampler.next_token()

    def logprobs(self, batch_index: int, token: int, top: int) -> TokenLogprob:
        text = self.piece(token)
        alternatives = tuple(TopLogprob(f"<{t}>", b"", -float(t)) for t in range(top))
        return TokenLogprob(text.decode(), text, -1.0, alternatives)

    def piece(self, token: int) -> bytes:
        return self.pieces.get(token, f"<{token}>".encode())

    def is_end_of_generation(self, token: int) -> bool:
        return token == END

    def forget(self, sequence: int, from_position: int = 0) -> bool:
        if from_position > 0 and not self.cuts:
            return False
        self.cells[sequence] = min(self.cells[sequence], from_position)
        return True

    def save_sequence(self, sequence: int) -> bytearray:
        return bytearray(self.cells[sequence].to_bytes(8, "little"))

    def restore_sequence(self, sequence: int, state: bytearray) -> bool:
        if not self.restores:
            return False
        self.cells[sequence] = int.from_bytes(state, "little")
        return True

    def copy_sequence(self, source: int, target: int) -> bool:
        return self.restore_sequence(target, self.save_sequence(source))

    def evaluated(self, sequence: int) -> int:
        """Tokens of one sequence evaluated so far, in all batches."""
        return sum(entry.sequence == sequence for batch in self.batches for entry in batch)

    def close(self) -> None:
        self.closed = True
