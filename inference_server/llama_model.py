"""The llama.cpp model, wrapped for the engine.

``LlamaModel`` is thread-confined: the engine calls it from its one worker
thread only, so a llama.cpp context is never used from two threads at once.
It knows nothing of sessions, asyncio, gRPC or HTTP.
"""

from __future__ import annotations

import codecs
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import llama_cpp
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from .domain import FinishReason, Sampling

log = logging.getLogger(__name__)

# Used when a GGUF file carries no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Samplers besides temperature and top_p keep llama.cpp's own defaults.
TOP_K = 40
MIN_P = 0.05


@dataclass(frozen=True)
class Generation:
    """What one call of ``LlamaModel.generate`` produced."""

    text: str
    finish_reason: FinishReason
    completion_tokens: int


class LlamaModel:
    """A loaded GGUF model with its chat template."""

    def __init__(
        self,
        model_path: str,
        *,
        n_ctx: int,
        n_gpu_layers: int,
        n_threads: int | None,
        n_batch: int,
    ) -> None:
        threads = n_threads or os.cpu_count() or 1
        self._llm = Llama(
            model_path=model_path,
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=n_batch,
            verbose=False,
        )
        self.n_ctx = self._llm.n_ctx()  # read once: the engine reads it from any thread
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            log.warning("%s has no chat template; using ChatML", model_path)
            template = CHATML_TEMPLATE
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(self._llm.token_eos()),
            bos_token=self._token_text(self._llm.token_bos()),
            add_generation_prompt=True,
        )

    def _token_text(self, token: int) -> str:
        if token == -1:
            return ""
        return llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Apply the model's chat template to ``messages`` and tokenize the prompt."""
        rendered = self._formatter(messages=messages)
        return self._llm.tokenize(
            rendered.prompt.encode("utf-8"),
            add_bos=not rendered.added_special,
            special=True,
        )

    def generate(
        self,
        prompt: list[int],
        sampling: Sampling,
        cancelled: threading.Event,
        emit: Callable[[str], None],
    ) -> Generation:
        """Generate a reply to ``prompt``, calling ``emit`` with each decoded piece.

        ``cancelled`` is checked before every token is evaluated, so a
        cancellation stops generation within one token. The tokens of the last
        prompt stay in the KV cache, and a prompt that begins with them (the same
        session's next turn) evaluates only what is new.
        """
        budget = min(sampling.max_tokens, self.n_ctx - len(prompt))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []
        generated: list[int] = []
        finish = FinishReason.LENGTH
        self._llm.set_seed(llama_cpp.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed)
        tokens = self._llm.generate(
            prompt,
            temp=sampling.temperature,
            top_p=sampling.top_p,
            top_k=TOP_K,
            min_p=MIN_P,
            repeat_penalty=1.0,
        )
        try:
            while len(generated) < budget:
                if cancelled.is_set():
                    finish = FinishReason.CANCELLED
                    break
                token = next(tokens)
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    finish = FinishReason.STOP
                    break
                piece = decoder.decode(self._llm.detokenize([token]))
                generated.append(token)
                if piece:
                    pieces.append(piece)
                    emit(piece)
        finally:
            tokens.close()
        tail = decoder.decode(b"", final=True)
        if tail:
            pieces.append(tail)
            emit(tail)
        return Generation("".join(pieces), finish, len(generated))

    def close(self) -> None:
        self._llm.close()
