"""Subclasses of the real runtime that observe or break it (no fakes: every
token is still evaluated and sampled by llama.cpp)."""

from __future__ import annotations

from collections.abc import Sequence

from inference_server.llama_runtime import BatchEntry, LlamaRuntime
from inference_server.runtime import DecodeFailed


class RecordingRuntime(LlamaRuntime):
    """The real runtime, recording every batch it decodes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[list[BatchEntry]] = []

    def decode(self, entries: Sequence[BatchEntry]) -> None:
        self.batches.append(list(entries))
        super().decode(entries)

    def evaluated(self, sequence: int) -> int:
        """Tokens of one sequence evaluated so far, in all batches."""
        return sum(entry.sequence == sequence for batch in self.batches for entry in batch)

    def widest_batch(self) -> int:
        """The most sequences that shared one batch."""
        return max(len({entry.sequence for entry in batch}) for batch in self.batches)


class FailingRuntime(LlamaRuntime):
    """The real runtime, whose third decode of a job fails (after the prompt
    and one generated token: two pieces of a reply are out by then). The
    shared start, which asks for no logits, is not counted."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.decodes = 0

    def decode(self, entries: Sequence[BatchEntry]) -> None:
        self.decodes += any(entry.wants_logits for entry in entries)
        if self.decodes == 3:
            raise DecodeFailed("llama_decode failed with status -3")
        super().decode(entries)


class RepackRecordingRuntime(LlamaRuntime):
    """The real runtime, remembering whether it was asked to repack weights."""

    def __init__(self, *args, extra_buffer_types: bool = True, **kwargs) -> None:
        self.extra_buffer_types = extra_buffer_types
        super().__init__(*args, extra_buffer_types=extra_buffer_types, **kwargs)


class CrashingRuntime(LlamaRuntime):
    """The real runtime, whose sampling raises an unexpected error from the
    fourth token on (a bug on the scheduler's thread)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.samples = 0

    def sample(self, sampler, batch_index: int) -> int:
        self.samples += 1
        if self.samples >= 4:
            raise ValueError("an unexpected error while sampling")
        return super().sample(sampler, batch_index)


class NoRestoreRuntime(LlamaRuntime):
    """The real runtime, whose ``llama_state_seq_set_data`` is refused: every
    prompt is evaluated from its first token, as before the shared start."""

    def restore_sequence(self, sequence: int, state: bytearray) -> bool:
        return False

    def copy_sequence(self, source: int, target: int) -> bool:
        return False
