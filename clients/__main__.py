"""Terminal chat: ``llamachat [chat|sessions|clear] ...`` (installed with pip),
or ``python -m clients ...`` from a checkout.

    python -m clients chat                      # interactive; replies stream as they come
    python -m clients chat "Tell me a joke"     # one message
    python -m clients chat --session ID "And another one?"
    python -m clients sessions
    python -m clients clear ID

REST by default (``--url``, default http://localhost:8002); ``--grpc ADDRESS``
talks to the inference core directly instead. In interactive chat, ``/clear``
starts a new conversation and ``/quit`` (or Ctrl-D) leaves.
"""

from __future__ import annotations

import argparse
import sys

from .errors import ChatAPIError
from .grpc_client import GrpcChatClient
from .rest_client import DEFAULT_URL, LLMChatClient


def parse_args(argv: list[str], prog: str = "llamachat") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description="Chat with the LLaMA Chat service.")
    parser.add_argument("--url", default=DEFAULT_URL, help="REST base URL")
    parser.add_argument("--grpc", metavar="ADDRESS", help="use gRPC at ADDRESS instead of REST")
    commands = parser.add_subparsers(dest="command", required=True)
    chat = commands.add_parser("chat", help="chat (interactive without a message)")
    chat.add_argument("message", nargs="*", help="a message to send and exit")
    chat.add_argument("--session", help="continue this session")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--max-tokens", type=int)
    commands.add_parser("sessions", help="list the sessions")
    clear = commands.add_parser("clear", help="forget a session")
    clear.add_argument("session")
    return parser.parse_args(argv)


def say(client: LLMChatClient | GrpcChatClient, message: str, args: argparse.Namespace) -> None:
    for piece in client.stream(message, temperature=args.temperature, max_tokens=args.max_tokens):
        print(piece, end="", flush=True)
    print()


def interactive(client: LLMChatClient | GrpcChatClient, args: argparse.Namespace) -> None:
    print("Type a message; /clear starts over, /quit leaves.", file=sys.stderr)
    while True:
        print("you> ", end="", file=sys.stderr, flush=True)
        raw = sys.stdin.readline()
        if not raw:  # Ctrl-D
            print(file=sys.stderr)
            return
        line = raw.strip()
        if line == "/quit":
            return
        if line == "/clear":
            client.clear()
            print("(new conversation)", file=sys.stderr)
        elif line:
            print("bot> ", end="", flush=True)
            say(client, line, args)


def run(args: argparse.Namespace) -> None:
    session = getattr(args, "session", None) if args.command == "chat" else None
    client: LLMChatClient | GrpcChatClient = (
        GrpcChatClient(args.grpc, session_id=session)
        if args.grpc
        else LLMChatClient(args.url, session_id=session)
    )
    with client:
        if args.command == "sessions":
            print("\n".join(client.sessions()))
        elif args.command == "clear":
            client.session_id = args.session
            client.clear()
            print(f"cleared {args.session}")
        elif args.message:
            say(client, " ".join(args.message), args)
            print(f"(session {client.session_id})", file=sys.stderr)
        else:
            interactive(client, args)


def main(argv: list[str] | None = None, prog: str = "llamachat") -> int:
    """The ``llamachat`` command; ``prog`` is the name its help shows."""
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)
    try:
        run(args)
    except ChatAPIError as error:
        print(f"error: {error.detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(prog=f"python -m {__package__}"))
