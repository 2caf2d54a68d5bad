"""API keys: sources, hashing, header forms, rights, and that raw keys are never kept."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import yaml

from serve_app.config import ApiKeyConfig, AuthConfig, BudgetConfig, RateLimitConfig
from serve_app.errors import Forbidden, Unauthorized, to_http
from serve_app.keys import ANONYMOUS, KeyConfigError, KeyRing, hash_key

RAW = "sk-unit-0123456789abcdef"  # 24 characters
OTHER = "sk-other-fedcba9876543210"


def auth(*keys: dict, enabled: bool = True, keys_file: str | None = None) -> AuthConfig:
    return AuthConfig(enabled=enabled, keys=[ApiKeyConfig(**k) for k in keys], keys_file=keys_file)


def reader(files: dict[str, str]) -> Callable[[str], str]:
    def read(path: str) -> str:
        if path not in files:
            raise FileNotFoundError(path)
        return files[path]

    return read


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# ----------------------------------------------------------------------------- sources


def test_sha256_source_authenticates_the_key() -> None:
    ring = KeyRing.load(auth({"id": "svc", "sha256": hash_key(RAW)}), env={})
    assert ring.authenticate(bearer(RAW)).id == "svc"
    assert ring.ids == ["svc"]


def test_sha256_is_case_insensitive_in_config() -> None:
    ring = KeyRing.load(auth({"id": "svc", "sha256": hash_key(RAW).upper()}), env={})
    assert ring.authenticate(bearer(RAW)).id == "svc"


def test_key_env_source_reads_the_injected_env() -> None:
    ring = KeyRing.load(auth({"id": "svc", "key_env": "UNIT_KEY"}), env={"UNIT_KEY": f"  {RAW}\n"})
    assert ring.authenticate(bearer(RAW)).id == "svc"


def test_key_file_source_reads_through_the_injected_reader() -> None:
    read = reader({"/secrets/svc": RAW + "\n"})
    ring = KeyRing.load(auth({"id": "svc", "key_file": "/secrets/svc"}), env={}, read=read)
    assert ring.authenticate(bearer(RAW)).id == "svc"


def test_keys_file_json_list_and_inline_keys_combine() -> None:
    entries = [{"id": "file-key", "sha256": hash_key(OTHER), "models": ["qa"], "admin": True}]
    read = reader({"/k/keys.json": json.dumps(entries)})
    ring = KeyRing.load(auth({"id": "inline", "sha256": hash_key(RAW)}, keys_file="/k/keys.json"), env={}, read=read)
    assert sorted(ring.ids) == ["file-key", "inline"]
    p = ring.authenticate(bearer(OTHER))
    assert (p.id, p.models, p.admin) == ("file-key", frozenset({"qa"}), True)


def test_keys_file_yaml_with_a_keys_mapping() -> None:
    text = yaml.safe_dump({"keys": [{"id": "y1", "key_env": "Y1_KEY"}, {"id": "y2", "sha256": hash_key(OTHER)}]})
    read = reader({"/k/keys.yaml": text})
    ring = KeyRing.load(auth(keys_file="/k/keys.yaml"), env={"Y1_KEY": RAW}, read=read)
    assert ring.authenticate(bearer(RAW)).id == "y1"
    assert ring.authenticate({"x-api-key": OTHER}).id == "y2"


def test_missing_env_names_the_key_id_and_env_var() -> None:
    with pytest.raises(KeyConfigError) as info:
        KeyRing.load(auth({"id": "svc", "key_env": "NOT_SET_ANYWHERE"}), env={})
    assert "'svc'" in str(info.value) and "NOT_SET_ANYWHERE" in str(info.value)


def test_short_key_is_refused_and_its_value_never_shown() -> None:
    value = "tiny-val-15char"  # 15 characters: one short
    assert len(value) == 15
    with pytest.raises(KeyConfigError) as info:
        KeyRing.load(auth({"id": "svc", "key_env": "K"}), env={"K": value})
    assert "'svc'" in str(info.value)
    assert value not in str(info.value)


def test_sixteen_characters_is_enough() -> None:
    ring = KeyRing.load(auth({"id": "svc", "key_env": "K"}), env={"K": "x" * 16})
    assert ring.authenticate(bearer("x" * 16)).id == "svc"


def test_unreadable_key_file_names_the_id() -> None:
    with pytest.raises(KeyConfigError, match="'svc'.*/secrets/missing"):
        KeyRing.load(auth({"id": "svc", "key_file": "/secrets/missing"}), env={}, read=reader({}))


def test_unreadable_keys_file_is_a_key_config_error() -> None:
    with pytest.raises(KeyConfigError, match="keys_file"):
        KeyRing.load(auth(keys_file="/k/nope.yaml"), env={}, read=reader({}))


def test_duplicate_ids_across_inline_keys_and_keys_file() -> None:
    read = reader({"/k/keys.json": json.dumps([{"id": "svc", "sha256": hash_key(OTHER)}])})
    with pytest.raises(KeyConfigError, match="duplicate.*svc"):
        KeyRing.load(auth({"id": "svc", "sha256": hash_key(RAW)}, keys_file="/k/keys.json"), env={}, read=read)


def test_invalid_json_keys_file() -> None:
    with pytest.raises(KeyConfigError, match="not valid JSON/YAML"):
        KeyRing.load(auth(keys_file="/k/keys.json"), env={}, read=reader({"/k/keys.json": "[{"}))


def test_invalid_yaml_keys_file_is_a_key_config_error() -> None:
    secret_line = "- id: [svc\n  sha256: not-a-digest-but-a-secret-line"
    with pytest.raises(KeyConfigError) as info:
        KeyRing.load(auth(keys_file="/k/keys.yaml"), env={}, read=reader({"/k/keys.yaml": secret_line}))
    assert "secret-line" not in str(info.value)


def test_keys_file_that_is_not_a_list() -> None:
    with pytest.raises(KeyConfigError, match="list"):
        KeyRing.load(auth(keys_file="/k/keys.json"), env={}, read=reader({"/k/keys.json": '{"id": "x"}'}))


def test_keys_file_entry_errors_name_the_entry_and_field() -> None:
    text = json.dumps([{"id": "ok", "sha256": hash_key(RAW)}, {"id": "bad", "sha256": "abc"}])
    with pytest.raises(KeyConfigError, match=r"entry 1: sha256"):
        KeyRing.load(auth(keys_file="/k/keys.json"), env={}, read=reader({"/k/keys.json": text}))


def test_enabled_with_an_empty_keys_file_is_refused() -> None:
    with pytest.raises(KeyConfigError, match="no API key"):
        KeyRing.load(auth(keys_file="/k/keys.json"), env={}, read=reader({"/k/keys.json": "[]"}))


def test_raw_keys_are_never_stored_on_the_ring() -> None:
    read = reader({"/secrets/f": OTHER})
    ring = KeyRing.load(
        auth({"id": "e", "key_env": "E_KEY"}, {"id": "f", "key_file": "/secrets/f"}),
        env={"E_KEY": RAW},
        read=read,
    )
    dumped = repr(vars(ring))
    for raw in (RAW, OTHER):
        assert raw not in dumped
        assert raw.encode() not in b"".join(d for d, _ in ring._entries)
    # What is kept are the digests.
    assert {d.hex() for d, _ in ring._entries} == {hash_key(RAW), hash_key(OTHER)}


# ----------------------------------------------------------------------------- headers


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing.load(
        auth(
            {"id": "user", "sha256": hash_key(RAW), "models": ["qa"],
             "rate_limit": {"requests_per_minute": 5}, "budget": {"hard_usd": 2.0}},
            {"id": "boss", "sha256": hash_key(OTHER), "admin": True},
        ),
        env={},
    )


@pytest.mark.parametrize("headers", [
    {"authorization": f"Bearer {RAW}"},
    {"authorization": f"bearer {RAW}"},
    {"authorization": f"Bearer   {RAW}  "},
    {"x-api-key": RAW},
    {"x-api-key": f" {RAW} "},
])
def test_accepted_header_forms(ring: KeyRing, headers: dict[str, str]) -> None:
    p = ring.authenticate(headers)
    assert p.id == "user" and p.authenticated


def test_principal_carries_the_keys_limits_and_budget(ring: KeyRing) -> None:
    p = ring.authenticate(bearer(RAW))
    assert p.rate_limit == RateLimitConfig(requests_per_minute=5)
    assert p.budget == BudgetConfig(hard_usd=2.0)
    assert p.models == frozenset({"qa"}) and p.admin is False


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "   "}, {"authorization": ""}])
def test_missing_key_is_401_missing(ring: KeyRing, headers: dict[str, str]) -> None:
    with pytest.raises(Unauthorized, match="missing API key") as info:
        ring.authenticate(headers)
    status, http_headers, body = to_http(info.value, "rid")
    assert status == 401
    assert http_headers["WWW-Authenticate"] == "Bearer"
    assert body["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("headers", [
    {"authorization": "Bearer sk-wrong-000000000000000"},
    {"x-api-key": "sk-wrong-000000000000000"},
    {"authorization": f"Basic {RAW}"},  # another scheme is an offered, invalid credential
    {"authorization": f"Basic {RAW}", "x-api-key": RAW},
    {"authorization": "Bearer"},
    {"authorization": "Bearer    "},
])
def test_wrong_or_non_bearer_key_is_401_invalid(ring: KeyRing, headers: dict[str, str]) -> None:
    with pytest.raises(Unauthorized, match="invalid API key") as info:
        ring.authenticate(headers)
    status, http_headers, _ = to_http(info.value, "rid")
    assert status == 401 and http_headers["WWW-Authenticate"] == "Bearer"


def test_error_messages_never_echo_the_presented_key(ring: KeyRing) -> None:
    with pytest.raises(Unauthorized) as info:
        ring.authenticate(bearer("sk-presented-secret-xyz"))
    assert "presented-secret" not in str(info.value)


def test_require_model(ring: KeyRing) -> None:
    user = ring.authenticate(bearer(RAW))
    user.require_model("qa")
    with pytest.raises(Forbidden, match="classify") as info:
        user.require_model("classify")
    assert to_http(info.value, "r")[0] == 403
    boss = ring.authenticate(bearer(OTHER))  # models defaults to ["*"]
    boss.require_model("classify")
    assert boss.may_call("anything")


def test_require_admin(ring: KeyRing) -> None:
    with pytest.raises(Forbidden, match="admin"):
        ring.authenticate(bearer(RAW)).require_admin()
    ring.authenticate(bearer(OTHER)).require_admin()


def test_auth_disabled_gives_the_anonymous_principal() -> None:
    ring = KeyRing.load(auth({"id": "svc", "sha256": hash_key(RAW)}, enabled=False), env={})
    for headers in ({}, {"authorization": "Bearer nonsense"}, bearer(RAW)):
        p = ring.authenticate(headers)
        assert p is ANONYMOUS
    assert not ANONYMOUS.authenticated and ANONYMOUS.may_call("qa")
    ANONYMOUS.require_admin()  # auth off: the admin endpoints are open, as the offline demo is


def test_disabled_auth_without_keys_loads() -> None:
    ring = KeyRing.load(AuthConfig(), env={})
    assert ring.ids == [] and ring.authenticate({}) is ANONYMOUS
