"""``LLMChatClient``: the documented Python client, on one ``httpx.Client``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from .errors import ChatAPIError, from_http

DEFAULT_URL = "http://localhost:8002"


class LLMChatClient:
    """A conversation over the REST API; remembers its session id between calls.

    Usage, as documented::

        client = LLMChatClient()
        print(client.chat("Hello!"))
        print(client.chat("What did I just say?"))
        client.clear()
    """

    def __init__(
        self, base_url: str = DEFAULT_URL, session_id: str | None = None, timeout: float = 600.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.session_id = session_id
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def __enter__(self) -> LLMChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _payload(self, message: str, **sampling: Any) -> dict[str, Any]:
        payload = {"message": message, **{k: v for k, v in sampling.items() if v is not None}}
        if self.session_id:
            payload["session_id"] = self.session_id
        return payload

    @staticmethod
    def _check(response: httpx.Response) -> None:
        if response.is_success:
            return
        response.read()
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise from_http(response.status_code, detail)

    def chat(
        self,
        message: str,
        temperature: float = 0.7,
        max_tokens: int | None = None,
        top_p: float | None = None,
    ) -> str:
        """Send a message and return the whole reply."""
        response = self._http.post(
            "/chat",
            json=self._payload(
                message, temperature=temperature, max_tokens=max_tokens, top_p=top_p
            ),
        )
        self._check(response)
        data = response.json()
        self.session_id = data["session_id"]
        return data["response"]

    def stream(
        self,
        message: str,
        temperature: float = 0.7,
        max_tokens: int | None = None,
        top_p: float | None = None,
    ) -> Iterator[str]:
        """Send a message and yield the reply's pieces as they are generated."""
        payload = self._payload(
            message, temperature=temperature, max_tokens=max_tokens, top_p=top_p
        )
        with self._http.stream("POST", "/chat/stream", json=payload) as response:
            self._check(response)
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[len("data: ") :])
                if "token" in event:
                    yield event["token"]
                elif event.get("done"):
                    self.session_id = event["session_id"]
                    return
                elif "error" in event:
                    raise ChatAPIError(event["error"])

    def clear(self) -> None:
        """Forget this conversation on the server and start a new one."""
        if self.session_id:
            self._check(self._http.post("/chat/clear", json={"session_id": self.session_id}))
            self.session_id = None

    def sessions(self) -> list[str]:
        """Ids of all the caller's sessions on the server, page after page."""
        ids: list[str] = []
        params: dict[str, str] = {}
        while True:
            response = self._http.get("/sessions", params=params)
            self._check(response)
            page = response.json()
            ids += page["sessions"]
            if not page.get("next_cursor"):
                return ids
            params = {"cursor": page["next_cursor"]}

    def health(self) -> bool:
        """True when the service is up and its model loaded."""
        return self._http.get("/health").status_code == 200
