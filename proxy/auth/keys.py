"""API keys: who may connect, with which role, and how their secret is checked.

Owns turning the config's ``keys:`` into ``ApiKey`` values with SCRAM verifiers in
PostgreSQL's ``pg_authid`` format, and the SCRAM / md5 / cleartext checks as pure steps.
An unknown key id walks the same path as a known one with a wrong secret (a verifier made
up from a per-process secret), so that no reply or timing tells which ids exist.
"""

from __future__ import annotations

import base64
import enum
import fnmatch
import hashlib
import hmac
import secrets
from dataclasses import dataclass

import scramp

from ..config import Config, is_pattern
from ..config import Key as KeyConfig
from ..errors import INVALID_PASSWORD, AuthFailed, ConfigError, ProtocolViolation
from ..router.policy import KeyPolicy, compile_policy

MECHANISM = "SCRAM-SHA-256"
ITERATIONS = 4096
_SCRAM = scramp.ScramMechanism(MECHANISM)


class Role(enum.Enum):
    ADMIN = "admin"
    SERVER = "server"
    CLIENT = "client"
    DATABASE = "database"


@dataclass(frozen=True, slots=True)
class Verifier:
    salt: bytes
    stored_key: bytes
    server_key: bytes
    iterations: int

    @classmethod
    def from_secret(cls, secret: str, salt: bytes | None = None) -> Verifier:
        # 16-byte salts, as PostgreSQL makes them (and as the decoys for unknown ids are).
        salt = secrets.token_bytes(16) if salt is None else salt
        salt_, stored, server = _SCRAM.make_auth_info(secret, iteration_count=ITERATIONS, salt=salt)[:3]
        return cls(salt_, stored, server, ITERATIONS)

    @classmethod
    def parse(cls, text: str) -> Verifier:
        """``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``, as in pg_authid."""
        try:
            mech, rest = text.split("$", 1)
            head, keys = rest.split("$", 1)
            iterations, salt = head.split(":", 1)
            stored, server = keys.split(":", 1)
            if mech != MECHANISM:
                raise ValueError
            return cls(base64.b64decode(salt, validate=True), base64.b64decode(stored, validate=True),
                       base64.b64decode(server, validate=True), int(iterations))
        except ValueError:
            raise ValueError("not a SCRAM-SHA-256 verifier (SCRAM-SHA-256$4096:salt$StoredKey:ServerKey)") \
                from None

    def __str__(self) -> str:
        b64 = base64.b64encode
        return (f"{MECHANISM}${self.iterations}:{b64(self.salt).decode()}"
                f"${b64(self.stored_key).decode()}:{b64(self.server_key).decode()}")


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    role: Role
    verifier: Verifier
    plain: str | None  # kept only when md5 or cleartext auth is configured
    databases: frozenset[str] | None
    read_only: bool
    max_connections: int | None
    binding: int | str | None  # the shard-key value of a `database` key
    statement_timeout: float | None = None  # seconds; pgfleet cancels longer statements
    backend_role: str | None = None  # the PostgreSQL role its statements run as; None: the dsn's user
    policy: KeyPolicy | None = None  # None: nothing checked beyond routing (admin, plain server keys)
    tenant: str | None = None  # a database key bound to one tenant of the directory
    patterns: tuple[str, ...] = ()  # the entries of ``databases`` that are patterns (server_*)

    def may_use(self, database: str) -> bool:
        if self.databases is None or database in self.databases:
            return True
        return any(fnmatch.fnmatchcase(database, pattern) for pattern in self.patterns)

    @property
    def named(self) -> list[str]:
        """The databases its allow-list names outright (not by a pattern), sorted."""
        return sorted(name for name in self.databases or () if name not in self.patterns)


def load_keys(config: Config) -> dict[str, ApiKey]:
    keep_plain = config.listen.auth != "scram-sha-256"
    keys: dict[str, ApiKey] = {}
    for i, key in enumerate(config.keys):
        keys[key.id] = _api_key(key, keep_plain, f"keys[{i}].secret", config.backend_role_of(key))
    return keys


def _api_key(key: KeyConfig, keep_plain: bool, path: str, backend_role: str | None) -> ApiKey:
    if key.secret.startswith(MECHANISM + "$"):
        try:
            verifier = Verifier.parse(key.secret)
        except ValueError as exc:
            raise ConfigError(path, str(exc)) from None
        plain = None
    else:
        verifier = Verifier.from_secret(key.secret)
        plain = key.secret if keep_plain else None
    return ApiKey(
        id=key.id, role=Role(key.role), verifier=verifier, plain=plain,
        databases=frozenset(key.databases) if key.databases is not None else None,
        read_only=key.read_only, max_connections=key.max_connections, statement_timeout=key.statement_timeout,
        binding=key.user_id if key.user_id is not None else key.shard_key,
        backend_role=backend_role, policy=compile_policy(key.role, key.policy), tenant=key.tenant,
        patterns=tuple(name for name in key.databases or () if is_pattern(name)),
    )


def new_key(role: str) -> tuple[str, str, Verifier]:
    """A fresh key id, secret and verifier for ``pgfleet keys new``."""
    key_id = f"pf_{role}_{secrets.token_hex(4)}"
    secret = secrets.token_urlsafe(24)
    return key_id, secret, Verifier.from_secret(secret)


# A per-process secret from which verifiers for unknown key ids are made up.
_DECOY = secrets.token_bytes(32)


def _decoy_verifier(user: str) -> Verifier:
    digest = hmac.new(_DECOY, user.encode(), hashlib.sha256).digest()
    return Verifier(digest[:16], hmac.new(digest, b"stored", hashlib.sha256).digest(),
                    hmac.new(digest, b"server", hashlib.sha256).digest(), ITERATIONS)


def failed(user: str) -> AuthFailed:
    return AuthFailed(INVALID_PASSWORD, f'password authentication failed for user "{user}"',
                      hint="check the key id and secret in the connection string")


class ScramExchange:
    """The server side of one SCRAM-SHA-256 exchange, as two pure steps.

    ``first(client_first)`` returns server-first; ``final(client_final)`` returns
    server-final or raises ``AuthFailed``. Malformed messages raise ``ProtocolViolation``.
    """

    def __init__(self, user: str, key: ApiKey | None) -> None:
        self.user = user
        self.key = key
        verifier = key.verifier if key is not None else _decoy_verifier(user)
        info = (verifier.salt, verifier.stored_key, verifier.server_key, verifier.iterations)
        self._server = _SCRAM.make_server(lambda _name: info)

    def first(self, client_first: bytes) -> bytes:
        text = _ascii(client_first)
        # libpq sends an empty user name ("n=,") because PostgreSQL takes the user from the
        # startup packet; scramp refuses empty attributes, so it parses a stand-in name and
        # we put the client's own bare message back, which the proof is computed over.
        bare_at = _bare_start(text)
        bare = text[bare_at:]
        patched = text[:bare_at] + "n=*" + bare[2:] if bare.startswith("n=,") else text
        try:
            self._server.set_client_first(patched)
            self._server.client_first_bare = bare
            server_first: str = self._server.get_server_first()
            return server_first.encode()
        except scramp.ScramException as exc:
            raise ProtocolViolation(f"malformed SCRAM message: {exc.args[0]}") from None

    def final(self, client_final: bytes) -> bytes:
        text = _ascii(client_final)
        try:
            self._server.set_client_final(text)
        except scramp.ScramException as exc:
            if self._server.error == "invalid-proof" or "keys don't match" in str(exc.args[0]):
                raise failed(self.user) from None
            raise ProtocolViolation(f"malformed SCRAM message: {exc.args[0]}") from None
        if self.key is None:  # a decoy verifier can never be matched, but be explicit
            raise failed(self.user)
        server_final: str = self._server.get_server_final()
        return server_final.encode()


def _ascii(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation("malformed SCRAM message: not valid UTF-8") from None


def _bare_start(text: str) -> int:
    first = text.find(",")
    second = text.find(",", first + 1) if first >= 0 else -1
    if second < 0:
        raise ProtocolViolation("malformed SCRAM message: missing GS2 header")
    return second + 1


def check_md5(key: ApiKey | None, user: str, salt: bytes, response: str) -> None:
    """md5: ``"md5" + md5(md5(secret + user) + salt)``; unknown keys fail the same way."""
    plain = key.plain if key is not None else secrets.token_hex(16)
    if plain is None:
        raise failed(user)
    inner = hashlib.md5((plain + user).encode()).hexdigest()
    expected = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
    if not hmac.compare_digest(expected.encode(), response.encode()) or key is None:
        raise failed(user)


def check_secret(key: ApiKey | None, secret: str) -> bool:
    """Whether ``secret`` is the key's (HTTP's X-API-Secret): SCRAM's StoredKey computed from it
    (RFC 5802: H(HMAC(PBKDF2(secret, salt, i), "Client Key"))) is the verifier's. An unknown key
    costs the same time and fails."""
    verifier = key.verifier if key is not None else _decoy_verifier("?")
    salted = hashlib.pbkdf2_hmac("sha256", secret.encode(), verifier.salt, verifier.iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored = hashlib.sha256(client_key).digest()
    return hmac.compare_digest(stored, verifier.stored_key) and key is not None


def check_cleartext(key: ApiKey | None, user: str, response: str) -> None:
    plain = key.plain if key is not None else secrets.token_hex(16)
    if plain is None or not hmac.compare_digest(plain.encode(), response.encode()) or key is None:
        raise failed(user)
