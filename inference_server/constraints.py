"""What a reply must look like: a JSON Schema, any JSON object, or a GBNF
grammar, turned into the one GBNF grammar that the sampler chain enforces
(llama-cpp-python's ``json_schema_to_gbnf``, llama.cpp's own converter)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from .domain import Sampling, SamplingParams
from .errors import InvalidRequest

# llama-cpp-python's converter lets a string hold raw control characters (a
# newline), which JSON forbids; llama.cpp's own converter excludes them since.
LOOSE_CHAR_RULE = 'char ::= [^"\\\\]'
STRICT_CHAR_RULE = 'char ::= [^"\\\\\\x7F\\x00-\\x1F]'


# llama.cpp parses grammars recursively: a deep one overflows the stack of
# the thread that compiles it, and the converter writes a length bound N as N
# nested groups. So bounds, size and depth are capped.
MAX_LENGTH_BOUND = 1000
MAX_GRAMMAR_CHARS = 200_000
MAX_GRAMMAR_DEPTH = 1500
LENGTH_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties")


def check_bounds(schema: Any, param: str) -> None:
    """``InvalidRequest`` for a length bound past ``MAX_LENGTH_BOUND``."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for keyword in LENGTH_KEYWORDS:
                bound = node.get(keyword)
                if isinstance(bound, int | float) and bound > MAX_LENGTH_BOUND:
                    raise InvalidRequest(
                        f"{param}: {keyword} may be at most {MAX_LENGTH_BOUND}, got {bound}",
                        param=param,
                    )
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def check_grammar_shape(grammar: str, param: str) -> None:
    """``InvalidRequest`` for a grammar too long or nested too deep to compile safely."""
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise InvalidRequest(
            f"{param}: the grammar may be at most {MAX_GRAMMAR_CHARS} characters", param=param
        )
    depth = deepest = 0
    quote: str | None = None
    escaped = False
    for char in grammar:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif quote is not None:
            if char == quote:
                quote = None
        elif char == '"':
            quote = '"'
        elif char == "[":
            quote = "]"
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth -= 1
    if deepest > MAX_GRAMMAR_DEPTH:
        raise InvalidRequest(
            f"{param}: the grammar nests groups {deepest} deep, at most {MAX_GRAMMAR_DEPTH}",
            param=param,
        )


def schema_grammar(schema: Any, param: str) -> str:
    """The GBNF of a JSON Schema (a parsed one); ``InvalidRequest`` naming
    ``param`` when it is no schema the converter knows."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param} must be a JSON Schema object", param=param)
    check_bounds(schema, param)
    try:
        grammar = str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as error:  # the converter raises whatever its input trips
        raise InvalidRequest(
            f"{param} is not a JSON Schema this server can enforce: {error}", param=param
        ) from error
    return grammar.replace(LOOSE_CHAR_RULE, STRICT_CHAR_RULE)


def grammar_of(params: SamplingParams) -> tuple[str, str] | None:
    """The GBNF a request asks for and the parameter that asked, if any."""
    if params.json_schema is not None:
        try:
            schema = json.loads(params.json_schema)
        except (ValueError, RecursionError) as error:
            raise InvalidRequest(
                f"json_schema is not valid JSON: {error}", param="json_schema"
            ) from error
        return schema_grammar(schema, "json_schema"), "json_schema"
    if params.json_object:
        return str(JSON_GBNF), "json_object"
    if params.grammar is not None:
        return params.grammar, "grammar"
    return None


def constrained(
    sampling: Sampling, params: SamplingParams, runtime: Any, grammar: str | None = None
) -> Sampling:
    """``sampling`` with the request's grammar (or ``grammar``, which wins),
    checked against the model: the grammar compiles, the biased tokens exist.
    ``runtime`` is a ``LlamaRuntime`` (``check_grammar``, ``n_vocab``)."""
    n_vocab = runtime.n_vocab
    for token, _ in sampling.logit_bias:
        if token >= n_vocab:
            raise InvalidRequest(
                f"logit_bias: token {token} is past the vocabulary ({n_vocab} tokens)",
                param="logit_bias",
            )
    requested = grammar_of(params)
    if grammar is not None and requested is not None:
        raise InvalidRequest(
            f"{requested[1]} cannot be combined with tools: the tools decide the reply's format",
            param=requested[1],
        )
    asked = (grammar, "tools") if grammar is not None else requested
    if asked is None:
        return sampling
    text, param = asked
    check_grammar_shape(text, param)
    problem = runtime.check_grammar(text)
    if problem is not None:
        raise InvalidRequest(f"{param}: the grammar cannot be used: {problem}", param=param)
    return replace(sampling, grammar=text)
