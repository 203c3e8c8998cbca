"""llama.cpp alone, through its C API (the runtime the core uses, no scheduler,
no server): batched decode speed, and how logits depend on batch shape."""

from __future__ import annotations

import time
from pathlib import Path

import llama_cpp
import numpy as np

from inference_server.domain import Sampling
from inference_server.llama_runtime import BatchEntry, LlamaRuntime, Sampler

from .repack import use_extra_buffer_types

GREEDY = Sampling(temperature=0.0, top_p=1.0, max_tokens=1, seed=None)


def _runtime(model: Path, *, threads: int, sequences: int, n_ctx: int) -> LlamaRuntime:
    return LlamaRuntime(
        str(model),
        n_ctx=n_ctx,
        n_sequences=sequences,
        n_gpu_layers=-1,
        n_threads=threads,
        n_batch=512,
        extra_buffer_types=use_extra_buffer_types(),
    )


def batched_decode(
    model: Path, *, threads: int, batch_sizes: list[int], steps: int, prompts: list[str]
) -> dict[int, float]:
    """Generated tokens per second with ``b`` sequences decoded in every batch."""
    runtime = _runtime(model, threads=threads, sequences=max(batch_sizes), n_ctx=1024)
    rates = {}
    try:
        for b in batch_sizes:
            tokenized = [
                runtime.tokenize_chat([{"role": "user", "content": p}]) for p in prompts[:b]
            ]
            for seq, prompt in enumerate(tokenized):
                runtime.forget(seq)
                runtime.decode(
                    [BatchEntry(t, i, seq, i == len(prompt) - 1) for i, t in enumerate(prompt)]
                )
            samplers = [Sampler(GREEDY) for _ in range(b)]
            last = [runtime.sample(samplers[seq], -1) for seq in range(b)]
            positions = [len(p) for p in tokenized]
            start = time.perf_counter()
            for _ in range(steps):
                runtime.decode([BatchEntry(last[s], positions[s], s, True) for s in range(b)])
                last = [runtime.sample(samplers[s], s) for s in range(b)]
                positions = [p + 1 for p in positions]
            rates[b] = b * steps / (time.perf_counter() - start)
            for sampler in samplers:
                sampler.close()
    finally:
        runtime.close()
    return rates


def shape_dependence(model: Path, *, threads: int) -> dict[str, float]:
    """Largest logit difference of a prompt's last token between ways of
    evaluating the same tokens (0.0: bitwise identical)."""
    runtime = _runtime(model, threads=threads, sequences=2, n_ctx=1024)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(runtime._model))
    text = "My name is Alice and I love astronomy. " * 4 + "What do I love?"
    prompt = runtime.tokenize_chat([{"role": "user", "content": text}])

    def logits(chunks: list[int], *, beside: list[int] | None = None) -> np.ndarray:
        runtime.forget(0)
        runtime.forget(1)
        position = 0
        for size in [c for c in chunks if c]:
            tokens = prompt[position : position + size]
            entries = [
                BatchEntry(t, position + i, 0, i == len(tokens) - 1) for i, t in enumerate(tokens)
            ]
            index = len(entries) - 1
            if beside is not None:  # another sequence's tokens in the same batch
                entries = [BatchEntry(t, i, 1, False) for i, t in enumerate(beside)] + entries
                index += len(beside)
            runtime.decode(entries)
            position += size
        row = llama_cpp.llama_get_logits_ith(runtime._ctx, index)
        return np.ctypeslib.as_array(row, shape=(n_vocab,)).copy()

    try:
        n = len(prompt)
        whole = logits([n])
        return {
            "beside another sequence": float(np.abs(logits([n], beside=prompt[:20]) - whole).max()),
            "in chunks of 10": float(np.abs(logits([10] * (n // 10) + [n % 10]) - whole).max()),
            "one token at a time": float(np.abs(logits([1] * n) - whole).max()),
        }
    finally:
        runtime.close()
