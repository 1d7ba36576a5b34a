"""Client authentication (proxy/auth/keys.py): SCRAM-SHA-256 against pg_authid-style verifiers.

The client side of every exchange is scramp's ``ScramClient`` (a real SCRAM implementation),
or, for the empty user name that libpq sends (``n=,``), a few lines of RFC 5802 written out
here with hashlib. Wrong secrets and unknown keys must fail alike (28P01, same words);
malformed messages are protocol violations (08P01).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import scramp

from proxy.auth.keys import (
    ApiKey,
    Role,
    ScramExchange,
    Verifier,
    check_cleartext,
    check_md5,
    failed,
    load_keys,
    new_key,
)
from proxy.config import load_text
from proxy.errors import AuthFailed, ConfigError, ProtocolViolation

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
databases: {primary: {dsn: "postgresql://u@127.0.0.1:5432/db"}}
keys:
  - {id: pf_app, secret: app-secret, role: server}
  - {id: pf_ro, secret: ro-secret, role: client, read_only: true, databases: [primary]}
"""


def keys(auth: str = "scram-sha-256") -> dict[str, ApiKey]:
    if auth == "password":  # only valid with listen.tls (certificate files): the keys do not care
        config = load_text(CONFIG, env={})
        return load_keys(msgspec.structs.replace(config, listen=msgspec.structs.replace(config.listen, auth=auth)))
    return load_keys(load_text(CONFIG + f"listen: {{auth: {auth}}}\n", env={}))


def scram_login(exchange: ScramExchange, user: str, secret: str) -> scramp.ScramClient:
    """Run a full exchange with scramp as the client; raises what the server side raises."""
    client = scramp.ScramClient(["SCRAM-SHA-256"], user, secret)
    server_first = exchange.first(client.get_client_first().encode())
    client.set_server_first(server_first.decode())
    server_final = exchange.final(client.get_client_final().encode())
    client.set_server_final(server_final.decode())  # checks the server's signature
    return client


# ---------------------------------------------------------------------------------------------
# SCRAM


def test_scram_right_secret_is_accepted_and_server_signature_verifies() -> None:
    key = keys()["pf_app"]
    scram_login(ScramExchange("pf_app", key), "pf_app", "app-secret")


def test_scram_server_first_carries_the_verifier_salt_and_iterations() -> None:
    key = keys()["pf_app"]
    client = scramp.ScramClient(["SCRAM-SHA-256"], "pf_app", "app-secret")
    client_first = client.get_client_first()
    first = ScramExchange("pf_app", key).first(client_first.encode()).decode()
    attrs = dict(part.split("=", 1) for part in first.split(","))
    client_nonce = client_first.split("r=", 1)[1]
    assert attrs["r"].startswith(client_nonce) and len(attrs["r"]) > len(client_nonce)
    assert base64.b64decode(attrs["s"]) == key.verifier.salt
    assert attrs["i"] == "4096"


def _empty_user_login(exchange: ScramExchange, secret: str) -> bytes:
    """RFC 5802 by hand, as libpq does it: gs2 header ``n,,`` and user name ``n=`` empty."""
    nonce = base64.b64encode(os.urandom(18)).decode()
    bare = f"n=,r={nonce}"
    server_first = exchange.first(f"n,,{bare}".encode()).decode()
    attrs = dict(part.split("=", 1) for part in server_first.split(","))
    salted = hashlib.pbkdf2_hmac("sha256", secret.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    without_proof = f"c=biws,r={attrs['r']}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    final = exchange.final(f"{without_proof},p={base64.b64encode(proof).decode()}".encode()).decode()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    expected = hmac.new(server_key, auth_message, hashlib.sha256).digest()
    assert final == f"v={base64.b64encode(expected).decode()}"
    return final.encode()


def test_scram_with_the_empty_user_name_libpq_sends() -> None:
    key = keys()["pf_app"]
    _empty_user_login(ScramExchange("pf_app", key), "app-secret")


def test_scram_with_the_empty_user_name_and_wrong_secret_fails() -> None:
    key = keys()["pf_app"]
    with pytest.raises(AuthFailed) as err:
        _empty_user_login(ScramExchange("pf_app", key), "not-the-secret")
    assert err.value.sqlstate == "28P01"


def test_scram_wrong_secret_is_28P01() -> None:
    key = keys()["pf_app"]
    with pytest.raises(AuthFailed) as err:
        scram_login(ScramExchange("pf_app", key), "pf_app", "wrong-secret")
    assert err.value.sqlstate == "28P01"
    assert err.value.message == 'password authentication failed for user "pf_app"'


def test_scram_unknown_key_fails_exactly_like_a_wrong_secret() -> None:
    with pytest.raises(AuthFailed) as wrong:
        scram_login(ScramExchange("pf_app", keys()["pf_app"]), "pf_app", "wrong-secret")
    with pytest.raises(AuthFailed) as unknown:
        scram_login(ScramExchange("pf_app", None), "pf_app", "app-secret")
    assert unknown.value.sqlstate == wrong.value.sqlstate == "28P01"
    assert unknown.value.message == wrong.value.message
    assert unknown.value.hint == wrong.value.hint
    assert type(unknown.value) is type(wrong.value)


def test_scram_unknown_key_gets_a_stable_plausible_salt() -> None:
    """No key enumeration: an unknown id gets a server-first like a real one, the same each time."""
    def salt_of(user: str) -> tuple[str, str]:
        client = scramp.ScramClient(["SCRAM-SHA-256"], user, "x")
        first = ScramExchange(user, None).first(client.get_client_first().encode()).decode()
        attrs = dict(part.split("=", 1) for part in first.split(","))
        return attrs["s"], attrs["i"]

    salt, iterations = salt_of("pf_nobody")
    assert salt_of("pf_nobody") == (salt, iterations)
    assert salt_of("pf_other")[0] != salt
    known = keys()["pf_app"].verifier
    assert iterations == str(known.iterations) == "4096"
    # The salt of an unknown id must look like the salt of a real key (here one whose plain
    # secret was hashed at load), or its length alone tells which key ids exist.
    assert len(base64.b64decode(salt)) == len(known.salt)


@pytest.mark.parametrize("client_first", [
    b"garbage",
    b"n,",
    b"n,,",
    b"n,,r=abc",              # no user name attribute
    b"n,,n=k",                # no nonce
    b"n,,n=k,r=",             # empty nonce
    b"p=tls-server-end-point,,n=k,r=abc",  # channel binding we never offered
    b"\xff\xfe\xfd",
    b"",
])
def test_scram_malformed_client_first_is_a_protocol_violation(client_first: bytes) -> None:
    with pytest.raises(ProtocolViolation) as err:
        ScramExchange("pf_app", keys()["pf_app"]).first(client_first)
    assert err.value.sqlstate == "08P01"
    assert "SCRAM" in err.value.message


def _final_variants() -> list[tuple[str, object]]:
    return [
        ("garbage", lambda cf: "garbage"),
        ("no proof", lambda cf: cf.rsplit(",", 1)[0]),
        ("only channel binding", lambda cf: "c=biws"),
        ("extra attribute", lambda cf: cf + ",x=1"),
        ("wrong channel binding", lambda cf: cf.replace("c=biws", "c=eHh4")),
        ("wrong nonce", lambda cf: "c=biws,r=not-our-nonce," + cf.rsplit(",", 1)[1]),
        ("proof too short", lambda cf: cf.rsplit(",", 1)[0] + ",p=AAAA"),
        ("proof not base64", lambda cf: cf.rsplit(",", 1)[0] + ",p=!!!!"),
        ("empty", lambda cf: ""),
    ]


@pytest.mark.parametrize("name,mangle", _final_variants(), ids=[v[0] for v in _final_variants()])
def test_scram_malformed_client_final_is_a_protocol_violation(name: str, mangle) -> None:  # type: ignore[no-untyped-def]
    client = scramp.ScramClient(["SCRAM-SHA-256"], "pf_app", "app-secret")
    exchange = ScramExchange("pf_app", keys()["pf_app"])
    client.set_server_first(exchange.first(client.get_client_first().encode()).decode())
    with pytest.raises(ProtocolViolation) as err:
        exchange.final(mangle(client.get_client_final()).encode())
    assert err.value.sqlstate == "08P01"


def test_scram_well_formed_but_wrong_proof_is_28P01_not_08P01() -> None:
    client = scramp.ScramClient(["SCRAM-SHA-256"], "pf_app", "app-secret")
    exchange = ScramExchange("pf_app", keys()["pf_app"])
    client.set_server_first(exchange.first(client.get_client_first().encode()).decode())
    forged = client.get_client_final().rsplit(",", 1)[0] + ",p=" + base64.b64encode(b"\x01" * 32).decode()
    with pytest.raises(AuthFailed) as err:
        exchange.final(forged.encode())
    assert err.value.sqlstate == "28P01"


# ---------------------------------------------------------------------------------------------
# Verifiers


def _pg_verifier(secret: str, salt: bytes, iterations: int = 4096) -> str:
    """What PostgreSQL stores in pg_authid.rolpassword, computed from RFC 5802/7677 directly."""
    salted = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)
    stored = hashlib.sha256(hmac.new(salted, b"Client Key", hashlib.sha256).digest()).digest()
    server = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored).decode()}:{b64(server).decode()}"


def test_verifier_from_secret_matches_postgresql_format() -> None:
    salt = bytes(range(16))
    assert str(Verifier.from_secret("s3cret", salt=salt)) == _pg_verifier("s3cret", salt)


@pytest.mark.parametrize("iterations", [4096, 10000])
def test_verifier_parse_format_round_trip(iterations: int) -> None:
    text = _pg_verifier("another", b"0123456789abcdef", iterations)
    verifier = Verifier.parse(text)
    assert verifier.iterations == iterations
    assert verifier.salt == b"0123456789abcdef"
    assert str(verifier) == text
    assert Verifier.parse(str(verifier)) == verifier


@pytest.mark.parametrize("text", [
    "",
    "md5abcdef",
    "SCRAM-SHA-1$4096:c2FsdA==$AAAA:BBBB",
    "SCRAM-SHA-256$4096:c2FsdA==",
    "SCRAM-SHA-256$x:c2FsdA==$AAAA:BBBB",
    "SCRAM-SHA-256$4096:not*base64$AAAA:BBBB",
    "SCRAM-SHA-256$4096:c2FsdA==$AAAA",
])
def test_verifier_parse_refuses_malformed_text(text: str) -> None:
    with pytest.raises(ValueError, match="not a SCRAM-SHA-256 verifier"):
        Verifier.parse(text)


def test_a_verifier_in_the_config_authenticates_its_secret() -> None:
    verifier = _pg_verifier("from-pg-authid", os.urandom(16))
    cfg = load_text(f"""
databases: {{primary: {{dsn: "postgresql://u@h/db"}}}}
keys: [{{id: pf_v, secret: "{verifier}", role: server}}]
""", env={})
    key = load_keys(cfg)["pf_v"]
    assert str(key.verifier) == verifier
    assert key.plain is None
    scram_login(ScramExchange("pf_v", key), "pf_v", "from-pg-authid")
    with pytest.raises(AuthFailed):
        scram_login(ScramExchange("pf_v", key), "pf_v", verifier)  # the verifier is not the secret


def test_a_malformed_verifier_in_the_config_names_the_key() -> None:
    cfg = load_text("""
databases: {primary: {dsn: "postgresql://u@h/db"}}
keys:
  - {id: a, secret: plain, role: server}
  - {id: b, secret: "SCRAM-SHA-256$4096:broken", role: server}
""", env={})
    with pytest.raises(ConfigError) as err:
        load_keys(cfg)
    assert str(err.value).startswith("keys[1].secret: not a SCRAM-SHA-256 verifier")


def test_plain_secrets_are_dropped_unless_md5_or_cleartext_is_configured() -> None:
    assert keys()["pf_app"].plain is None
    assert keys("md5")["pf_app"].plain == "app-secret"
    assert keys("password")["pf_app"].plain == "app-secret"


def test_key_roles_and_policy_come_from_the_config() -> None:
    ro = keys()["pf_ro"]
    assert ro.role is Role.CLIENT and ro.read_only
    assert ro.databases == frozenset({"primary"})
    assert ro.may_use("primary") and not ro.may_use("analytics")
    app = keys()["pf_app"]
    assert app.role is Role.SERVER and not app.read_only and app.databases is None
    assert app.may_use("anything")


# ---------------------------------------------------------------------------------------------
# md5 and cleartext


def _md5_response(secret: str, user: str, salt: bytes) -> str:
    inner = hashlib.md5((secret + user).encode()).hexdigest()
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()


def test_md5_right_secret_passes() -> None:
    key = keys("md5")["pf_app"]
    check_md5(key, "pf_app", b"\x01\x02\x03\x04", _md5_response("app-secret", "pf_app", b"\x01\x02\x03\x04"))


@pytest.mark.parametrize("response", [
    _md5_response("wrong", "pf_app", b"salt"),
    _md5_response("app-secret", "pf_app", b"SALT"),      # answer for another salt (a replay)
    _md5_response("app-secret", "pf_other", b"salt"),    # the user name is part of the hash
    "app-secret",
    "",
])
def test_md5_wrong_response_is_28P01(response: str) -> None:
    with pytest.raises(AuthFailed) as err:
        check_md5(keys("md5")["pf_app"], "pf_app", b"salt", response)
    assert err.value.sqlstate == "28P01"
    assert err.value.message == failed("pf_app").message


def test_md5_unknown_key_and_key_without_plain_secret_fail_the_same_way() -> None:
    with pytest.raises(AuthFailed) as unknown:
        check_md5(None, "pf_app", b"salt", _md5_response("app-secret", "pf_app", b"salt"))
    with pytest.raises(AuthFailed) as no_plain:  # a verifier-only key cannot answer md5
        check_md5(keys()["pf_app"], "pf_app", b"salt", _md5_response("app-secret", "pf_app", b"salt"))
    assert unknown.value.message == no_plain.value.message == failed("pf_app").message
    assert unknown.value.sqlstate == no_plain.value.sqlstate == "28P01"


def test_cleartext_check() -> None:
    key = keys("password")["pf_app"]
    check_cleartext(key, "pf_app", "app-secret")
    for bad_key, response in ((key, "app-secret "), (key, ""), (None, "app-secret")):
        with pytest.raises(AuthFailed) as err:
            check_cleartext(bad_key, "pf_app", response)
        assert err.value.sqlstate == "28P01"
        assert err.value.message == failed("pf_app").message


# ---------------------------------------------------------------------------------------------
# keys new


@pytest.mark.parametrize("role", ["admin", "server", "client", "database"])
def test_new_key_gives_a_working_id_secret_and_verifier(role: str) -> None:
    key_id, secret, verifier = new_key(role)
    assert key_id.startswith(f"pf_{role}_")
    assert len(secret) >= 24
    assert Verifier.parse(str(verifier)) == verifier
    cfg = load_text(f"""
databases: {{primary: {{dsn: "postgresql://u@h/db"}}}}
keys: [{{id: {key_id}, secret: "{verifier}", role: server}}]
""", env={})
    scram_login(ScramExchange(key_id, load_keys(cfg)[key_id]), key_id, secret)


def test_new_keys_are_unique() -> None:
    made = [new_key("server") for _ in range(20)]
    assert len({k[0] for k in made}) == 20
    assert len({k[1] for k in made}) == 20
    assert len({k[2].salt for k in made}) == 20


def test_cli_keys_new_prints_id_secret_and_verifier_that_agree() -> None:
    result = subprocess.run([sys.executable, "-m", "proxy", "keys", "new", "--role", "server"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
    assert result.returncode == 0, result.stderr
    fields = {}
    for line in result.stdout.splitlines():
        name, _, value = line.partition(":")
        if name in ("id", "secret", "verifier"):
            fields[name] = value.strip()
    assert fields["id"].startswith("pf_server_")
    verifier = Verifier.parse(fields["verifier"])
    key = ApiKey(fields["id"], Role.SERVER, verifier, None, None, False, None, None)
    scram_login(ScramExchange(fields["id"], key), fields["id"], fields["secret"])
    assert f'id: {fields["id"]}' in result.stdout and "role: server" in result.stdout
