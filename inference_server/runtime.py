"""What the scheduler needs of a model runtime, apart from llama.cpp.

``LlamaRuntime`` (``llama_runtime.py``) implements ``Runtime`` on llama.cpp;
the unit tests implement it with a scripted double, so that admission,
chunking, cancellation, stop sequences and failures are tested without a
model. Importing this module loads nothing of llama.cpp.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .domain import Sampling, TokenLogprob


@dataclass(frozen=True)
class BatchEntry:
    """One token of a batch: which sequence, at which position, and whether
    its logits are wanted (to sample the sequence's next token)."""

    token: int
    position: int
    sequence: int
    wants_logits: bool


class NoKvSlot(RuntimeError):
    """``llama_decode`` returned 1: the KV cache has no room for this batch.
    Nothing of the batch was kept; a smaller batch may fit."""


class DecodeFailed(RuntimeError):
    """``llama_decode`` failed otherwise (an invalid batch, a compute error)."""


class NoTokenAllowed(RuntimeError):
    """A request's grammar allows no token at this point of its reply: the
    request ends with an error, and nothing is accepted into its sampler."""


class TokenSampler(Protocol):
    """A request's sampler chain; closed when its job ends."""

    def close(self) -> None: ...


class Runtime(Protocol):
    """A loaded model with ``n_sequences`` sequences of ``n_ctx`` cells each.

    Every method runs on the scheduler's thread, except ``piece`` and
    ``is_end_of_generation``, which read the vocabulary only.
    """

    n_ctx: int
    n_sequences: int
    n_batch: int

    def decode(self, entries: Sequence[BatchEntry]) -> None:
        """Evaluate one batch of at most ``n_batch`` tokens of any sequences.
        Raises ``NoKvSlot`` or ``DecodeFailed``."""
        ...

    def sampler(self, sampling: Sampling) -> TokenSampler:
        """A new sampler chain for one request."""
        ...

    def sample(self, sampler: TokenSampler, batch_index: int) -> int:
        """Draw (and accept) the next token from the logits of a batch entry of
        the last ``decode``."""
        ...

    def logprobs(self, batch_index: int, token: int, top: int) -> TokenLogprob:
        """``token``'s log probability at a batch entry of the last ``decode``,
        with the ``top`` most likely tokens there."""
        ...

    def piece(self, token: int) -> bytes:
        """The bytes a generated token stands for, whole (control tokens: none)."""
        ...

    def is_end_of_generation(self, token: int) -> bool: ...

    def forget(self, sequence: int, from_position: int = 0) -> bool:
        """Drop a sequence's cells from ``from_position`` on; ``False`` when the
        model cannot drop part of a sequence (recurrent, hybrid and
        sliding-window models), then nothing was dropped."""
        ...

    def save_sequence(self, sequence: int) -> bytearray: ...

    def restore_sequence(self, sequence: int, state: bytearray) -> bool: ...

    def copy_sequence(self, source: int, target: int) -> bool:
        """``source``'s cells into the empty ``target``; ``False`` if refused."""
        ...

    def close(self) -> None: ...
