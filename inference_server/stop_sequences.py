"""Stop sequences: where a streamed reply must end, found as it streams."""

from __future__ import annotations


class StopSequences:
    """Feeds a reply piece by piece and says what may be shown of it.

    Text that could be the start of a stop sequence is held back until the
    next pieces tell whether it is; at the first stop sequence, the reply ends
    just before it (``stopped``). ``text`` is all that was released.
    """

    def __init__(self, sequences: tuple[str, ...]) -> None:
        self._sequences = sequences
        self._held = ""
        self.text = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The part of the reply that can be released now (may be empty)."""
        if self.stopped:
            return ""
        self._held += piece
        found = [i for i in (self._held.find(s) for s in self._sequences) if i >= 0]
        if found:
            self.stopped = True
            released, self._held = self._held[: min(found)], ""
        else:
            keep = self._longest_partial_match()
            released = self._held[: len(self._held) - keep]
            self._held = self._held[len(released) :]
        self.text += released
        return released

    def flush(self) -> str:
        """The end of a reply that stopped by itself: release what was held."""
        released, self._held = self._held, ""
        self.text += released
        return released

    def _longest_partial_match(self) -> int:
        """Length of the longest end of the held text that begins a stop sequence."""
        return max(
            (
                size
                for sequence in self._sequences
                for size in range(1, min(len(sequence) - 1, len(self._held)) + 1)
                if self._held.endswith(sequence[:size])
            ),
            default=0,
        )
