"""Typed errors of the engine. The gRPC servicer maps them to status codes in
one place (``servicer.status_for``); nothing matches on message strings."""


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidRequest(EngineError):
    """The request itself is wrong: a blank message, a value out of range.
    ``param`` names the field at fault where one is (OpenAI's ``param``)."""

    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextOverflow(InvalidRequest):
    """The new message alone does not fit in the context window. Its wording
    has OpenAI's "maximum context length", which clients look for."""

    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, n_ctx: int, *, param: str = "messages") -> None:
        super().__init__(
            f"Message is too long for the context: this model's maximum context length is "
            f"{n_ctx} tokens, and the prompt needs {prompt_tokens} tokens, with at least one "
            "more for the reply. Please reduce the length of the messages.",
            param=param,
        )
        self.prompt_tokens = prompt_tokens
        self.n_ctx = n_ctx


class SessionNotFound(EngineError):
    """The session does not exist."""

    def __init__(self, session_id: str) -> None:
        super().__init__("Session not found")
        self.session_id = session_id


class Overloaded(EngineError):
    """Every slot is busy and the waiting queue is full: try again later."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"Server busy: {limit} requests are already running or waiting")
        self.limit = limit


class SessionStoreError(EngineError):
    """The session store failed (disk full, I/O error); nothing was saved."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"Session store unavailable: {reason}")
        self.reason = reason


class EngineNotReady(EngineError):
    """The model is still loading, or failed to load."""

    def __init__(self) -> None:
        super().__init__("Model not loaded")


class ModelLoadError(EngineError):
    """The model file could not be loaded (not a GGUF file, unsupported, too big)."""


class EngineFailed(EngineError):
    """The engine stopped on an unexpected error (the scheduler's thread
    died): nothing more can be generated until the core is restarted."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"The inference core failed and must restart: {cause!r}")
        self.cause = cause


class NoRoomInKvCache(EngineError):
    """llama.cpp found no room in the KV cache for this request's tokens, even
    decoded alone; other requests go on. Retrying the same request does not
    help, so it is answered as a bad request (INVALID_ARGUMENT, 400)."""

    def __init__(self) -> None:
        super().__init__("No room in the KV cache for this request; try a shorter one")


class SessionBusy(EngineError):
    """A turn of the session is running and another is already waiting."""

    def __init__(self, session_id: str) -> None:
        super().__init__(
            "Session is busy: a turn of it is running and another is waiting; "
            "send the next message after the reply"
        )
        self.session_id = session_id


class HistoryChanged(EngineError):
    """The session's history changed while a reply was being generated (the
    session was cleared, or another turn, of another replica, was added): the
    reply was built on a history that is no longer the stored one, so it was
    not kept."""

    def __init__(self, session_id: str) -> None:
        super().__init__(
            "Session history changed while the reply was generated (the session was "
            "cleared, or another turn was added to it): this reply was not kept; "
            "send the message again"
        )
        self.session_id = session_id
