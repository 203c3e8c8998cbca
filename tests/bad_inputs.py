"""Bad chat inputs that every protocol must refuse with a clear 4xx / INVALID_ARGUMENT."""

from __future__ import annotations

import json
from typing import Any

JSON_HEADERS = {"Content-Type": "application/json"}


def json_body(fields: dict[str, Any]) -> str:
    """``fields`` as JSON, with NaN and Infinity written as Python's parser reads
    them (httpx's ``json=`` refuses to send them)."""
    return json.dumps(fields)


def bad_chat_inputs(n_ctx: int) -> list[tuple[dict[str, Any], str]]:
    """(request fields, a phrase the error detail must contain)."""
    return [
        ({"message": ""}, "Message cannot be empty"),
        ({"message": "   \n\t "}, "Message cannot be empty"),
        ({"message": "hi", "temperature": -0.1}, "temperature must be between 0 and 2"),
        ({"message": "hi", "temperature": 2.01}, "temperature must be between 0 and 2"),
        ({"message": "hi", "top_p": -0.5}, "top_p must be between 0 and 1"),
        ({"message": "hi", "top_p": 1.5}, "top_p must be between 0 and 1"),
        ({"message": "hi", "max_tokens": 0}, "max_tokens must be between 1"),
        ({"message": "hi", "max_tokens": -3}, "max_tokens must be between 1"),
        ({"message": "hi", "max_tokens": n_ctx + 1}, "max_tokens must be between 1"),
        ({"message": "word " * (n_ctx + n_ctx // 2)}, "Message is too long for the context"),
        ({"message": "x" * 32_769}, "message must be at most 32768 characters"),
        ({"message": "hi", "session_id": "s" * 257}, "session_id must be at most 256 bytes"),
        ({"message": "hi", "session_id": "é" * 129}, "session_id must be at most 256 bytes"),
        ({"message": "hi", "temperature": float("nan")}, "temperature must be between 0 and 2"),
        ({"message": "hi", "temperature": float("inf")}, "temperature must be between 0 and 2"),
        ({"message": "hi", "top_p": float("nan")}, "top_p must be between 0 and 1"),
        ({"message": "hi", "max_tokens": 2**31 - 1}, "max_tokens must be between 1"),
    ]


# Bodies the REST gateway refuses before calling the core: wrong types and shapes.
MALFORMED_REST_BODIES: list[tuple[str, str]] = [
    ('{"message": 5}', "valid string"),
    ('{"message": null}', "valid string"),
    ("{}", "Field required"),
    ('{"message": "hi", "temperature": "hot"}', "temperature: Input should be a valid number"),
    ('{"message": "hi", "temperature": true}', "temperature: Input should be a valid number"),
    ('{"message": "hi", "max_tokens": true}', "max_tokens: Input should be a valid integer"),
    ('{"message": "hi", "max_tokens": 1.5}', "valid integer"),
    ('{"message": "hi", "max_tokens": 99999999999}', "less than or equal"),
    ('{"message": "hi", "session_id": 7}', "valid string"),
    ('["hi"]', "valid dictionary"),
    ('{"message": "hi",', "JSON decode error"),
    ("not json at all", "JSON decode error"),
    ('{"message": "hi", "seed": -1}', "greater than or equal to 0"),
    ('{"message": "hi", "seed": 4294967296}', "less than or equal"),
    ('{"message": "hi", "top_p": "0.9"}', "top_p: Input should be a valid number"),
    ('{"message": ["hi"]}', "valid string"),
    ('{"message": {"text": "hi"}}', "valid string"),
    ("null", "valid dictionary"),
]

# Bodies that parse as JSON of the right shape but are still wrong: 400.
BAD_REST_BODIES: list[tuple[str, str]] = [
    ('{"message": "hi", "temperature": 1e999}', "temperature must be between 0 and 2"),
    ('{"message": "\\ud800"}', "surrogates not allowed"),
    ('{"message": ' + "[" * 5000 + "]" * 5000 + "}", "error parsing the body"),
]

# Requests to the wrong place, or of the wrong kind: (method, path, JSON body,
# the status they must get).
MISDIRECTED_REST_REQUESTS: list[tuple[str, str, object, int]] = [
    ("GET", "/chat", None, 405),
    ("DELETE", "/sessions", None, 405),
    ("POST", "/nowhere", {"message": "hi"}, 404),
    ("POST", "/chat/clear", {}, 422),
    ("POST", "/chat/clear", {"session_id": 3}, 422),
    ("POST", "/chat/clear", {"session_id": "no-such-session"}, 404),
    ("GET", "/sessions/no-such-session", None, 404),
]
