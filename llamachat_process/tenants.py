"""API keys and the tenants they name, read alike by the core and the gateway.

Three sources, all optional:

- ``API_KEY``: one key, for the tenant ``default``;
- ``API_KEY_FILE``: a file holding that one key (so that no key needs to be on
  a command line or in the environment of every process);
- ``API_KEYS_FILE``: one ``TENANT KEY`` pair a line; ``#`` at the start of a
  line or after a blank starts a comment (a ``#`` inside a key is part of
  it), blank lines are skipped, a key may appear once, and a key written
  ``sha256:HEX`` is the SHA-256 of the key, so that the file need not hold
  keys in clear. One tenant may have several keys (to rotate them).

Without any key, every caller is the tenant ``default``: the service behaves
as the API documentation describes, with no key and one set of sessions.
Keys are compared as SHA-256 digests, in constant time, against every entry.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings

DEFAULT_TENANT = "default"
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SHA256_PREFIX = "sha256:"
COMMENT = re.compile(r"(^|\s)#.*$")


class KeyFileError(ValueError):
    """A keys file that cannot be read or has a malformed line."""


@dataclass(frozen=True)
class KeyRing:
    """The accepted keys (as SHA-256 digests), each with its tenant."""

    entries: tuple[tuple[str, bytes], ...] = ()

    @property
    def required(self) -> bool:
        """Whether callers must present a key."""
        return bool(self.entries)

    def tenant_for(self, key: str | None) -> str | None:
        """The tenant whose key this is (``default`` when no key is needed);
        ``None`` for a missing or unknown key."""
        if not self.entries:
            return DEFAULT_TENANT
        if not key:
            return None
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for tenant, expected in self.entries:  # every entry, whatever matches
            if hmac.compare_digest(digest, expected):
                found = tenant
        return found


def bearer_token(authorization: str | None) -> str | None:
    """The credentials of ``Authorization: Bearer <key>``, the scheme in any case."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def parse_keys_file(text: str, source: str = "API_KEYS_FILE") -> list[tuple[str, bytes]]:
    """The ``TENANT KEY`` lines of a keys file."""
    entries: list[tuple[str, bytes]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = COMMENT.sub("", raw).strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise KeyFileError(f"{source} line {number}: expected 'TENANT KEY'")
        tenant, key = parts
        if not TENANT_NAME.fullmatch(tenant):
            raise KeyFileError(
                f"{source} line {number}: a tenant is 1 to 64 letters, digits, '.', '_' or '-'"
            )
        digest = _digest(key, f"{source} line {number}")
        if any(digest == known for _, known in entries):
            raise KeyFileError(f"{source} line {number}: this key is listed already")
        entries.append((tenant, digest))
    return entries


def _digest(key: str, where: str) -> bytes:
    if key.startswith(SHA256_PREFIX):
        try:
            digest = bytes.fromhex(key[len(SHA256_PREFIX) :])
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise KeyFileError(f"{where}: sha256: must be followed by 64 hexadecimal digits")
        return digest
    return hashlib.sha256(key.encode()).digest()


def load_key_ring(
    api_key: str | None, api_key_file: Path | None, api_keys_file: Path | None
) -> KeyRing:
    """The keys of ``API_KEY``, ``API_KEY_FILE`` and ``API_KEYS_FILE`` together."""
    entries: list[tuple[str, bytes]] = []
    if api_key:
        entries.append((DEFAULT_TENANT, _digest(api_key, "API_KEY")))
    if api_key_file is not None:
        key = _read(api_key_file, "API_KEY_FILE").strip()
        if not key:
            raise KeyFileError(f"API_KEY_FILE {api_key_file} is empty")
        entries.append((DEFAULT_TENANT, _digest(key, "API_KEY_FILE")))
    if api_keys_file is not None:
        entries += parse_keys_file(_read(api_keys_file, "API_KEYS_FILE"))
    return KeyRing(tuple(entries))


def _read(path: Path, setting: str) -> str:
    try:
        return path.read_text()
    except OSError as error:
        raise KeyFileError(f"{setting} {path}: {error.strerror or error}") from error


class KeySettings(BaseSettings):
    """The API key settings, read alike by the core and the gateway."""

    api_key: SecretStr | None = Field(
        default=None,
        description="One API key, of the tenant 'default'; with any key set, REST calls need "
        "'Authorization: Bearer <key>' or 'X-API-Key: <key>' and gRPC calls the metadata "
        "'authorization: Bearer <key>' (see the README's 'Security model'). Visible in the "
        "process list when given as a flag: prefer API_KEY_FILE or API_KEYS_FILE.",
    )
    api_key_file: Path | None = Field(
        default=None, description="A file holding the one API key (as API_KEY)."
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="A file of 'TENANT KEY' lines (KEY may be sha256:HEX; '#' comments): "
        "several keys, each naming the tenant whose sessions it sees. The core and the "
        "gateway read the same file.",
    )

    def key_ring(self) -> KeyRing:
        """The keys these settings name (reads the files); ``KeyFileError`` if one is bad."""
        return load_key_ring(
            self.api_key.get_secret_value() if self.api_key else None,
            self.api_key_file,
            self.api_keys_file,
        )
