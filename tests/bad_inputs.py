"""Bad chat inputs that every protocol must refuse with a clear 4xx / INVALID_ARGUMENT."""

from __future__ import annotations

from typing import Any


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
        ({"message": "word " * (2 * n_ctx)}, "Message is too long for the context"),
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
]
