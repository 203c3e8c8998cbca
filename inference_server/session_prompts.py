"""The prompts of a session's turns, as token lists.

A session's prompt is the chat template rendered over the server's
``SYSTEM_PROMPT``, the kept exchanges and the new message. Its *start* (the
template's preamble and the system prompt, from the settings only) is the
same for every new conversation: the scheduler evaluates it once.
"""

from __future__ import annotations

from .domain import Exchange
from .errors import ContextOverflow
from .llama_runtime import LlamaRuntime
from .slots import common_prefix_length


class SessionPrompts:
    """Renders and tokenizes the prompts of sessions' turns."""

    def __init__(self, system_prompt: str | None) -> None:
        self._system_prompt = system_prompt

    def messages(self, history: list[Exchange], message: str) -> list[dict[str, str]]:
        messages = []
        if self._system_prompt:
            messages.append({"role": "system", "content": self._system_prompt})
        for exchange in history:
            messages.append({"role": "user", "content": exchange.user})
            messages.append({"role": "assistant", "content": exchange.assistant})
        messages.append({"role": "user", "content": message})
        return messages

    def fit(self, runtime: LlamaRuntime, history: list[Exchange], message: str) -> list[int]:
        """The turn's prompt, dropping the oldest exchanges until it leaves
        room for at least one generated token."""
        for start in range(len(history) + 1):
            prompt = runtime.tokenize_chat(self.messages(history[start:], message))
            if len(prompt) < runtime.n_ctx:
                return prompt
        raise ContextOverflow(len(prompt), runtime.n_ctx)

    def start(self, runtime: LlamaRuntime) -> list[int]:
        """The tokens every new conversation's prompt begins with: the longest
        start that the prompts of two different first messages share, so a
        template that renders the message's turn in any way still gives
        exactly the tokens a real prompt begins with."""
        one, other = (runtime.tokenize_chat(self.messages([], text)) for text in ("a", "b"))
        return one[: common_prefix_length(one, other)]
