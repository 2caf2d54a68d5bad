"""TrafficPolicy: the client address, admission (auth + rate limit + sticky seed), budgets and estimates."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.datastructures import Headers

from serve_app.config import AppArgs, RateLimitConfig
from serve_app.errors import BudgetExceeded, RateLimited, Unauthorized
from serve_app.keys import KeyRing, hash_key
from serve_app.policy import FORWARDED_PEER, TrafficPolicy, client_address
from serve_app.policy_store import PolicyStore

from .conftest import FakeClock, app_args

T0 = 6_000.0
USER_KEY = "sk-user-0123456789abcdef"
TOKEN_KEY = "sk-tokn-0123456789abcdef"


def policy_for(args: AppArgs, **kwargs: Any) -> TrafficPolicy:
    return TrafficPolicy(args, PolicyStore(None, "p"), KeyRing.load(args.policy.auth, env={}),
                         wall=kwargs.pop("wall", FakeClock(T0)), **kwargs)


def keyed_args(**policy: Any) -> AppArgs:
    return app_args(policy={
        "auth": {"enabled": True, "keys": [
            {"id": "user", "sha256": hash_key(USER_KEY), "models": ["qa"]},
            {"id": "tokens", "sha256": hash_key(TOKEN_KEY), "rate_limit": {"tokens_per_minute": 100},
             "budget": {"hard_usd": 1.0, "reserve_usd": 0.25}},
        ]},
        "rate_limit": {"requests_per_minute": 2},
        **policy,
    })


# ----------------------------------------------------------------------------- client address


@pytest.mark.parametrize(("xff", "peer", "hops", "expected"), [
    (None, "10.0.0.1", 0, "10.0.0.1"),
    ("6.6.6.6", "10.0.0.1", 0, "10.0.0.1"),  # 0 hops: whatever the client wrote is ignored
    ("6.6.6.6, 10.0.0.1", "10.0.0.1", 0, FORWARDED_PEER),  # the server already took the peer from the header
    ("6.6.6.6, 1.2.3.4", "10.0.0.9", 1, "1.2.3.4"),
    ("6.6.6.6, 1.2.3.4, 10.0.0.2", "10.0.0.9", 2, "1.2.3.4"),
    ("1.2.3.4:5555", "10.0.0.9", 1, "1.2.3.4"),
    ("[2001:db8::1]:443", "10.0.0.9", 1, "2001:db8::1"),
    ("2001:db8::1", "10.0.0.9", 1, "2001:db8::1"),
    (None, "10.0.0.9", 1, "10.0.0.9"),
    (" , ", "10.0.0.9", 1, "10.0.0.9"),
    (None, None, 0, "unknown"),
])
def test_client_address(xff: str | None, peer: str | None, hops: int, expected: str) -> None:
    headers = {} if xff is None else {"x-forwarded-for": xff}
    assert client_address(headers, peer, hops) == expected


def test_spoofed_left_entries_never_matter() -> None:
    for spoof in ("6.6.6.6", "1.1.1.1, 2.2.2.2", "evil"):
        assert client_address({"x-forwarded-for": f"{spoof}, 1.2.3.4"}, "10.0.0.9", 1) == "1.2.3.4"


def test_x_forwarded_for_in_several_field_lines_is_one_list() -> None:
    headers = Headers(raw=[(b"x-forwarded-for", b"6.6.6.6"), (b"x-forwarded-for", b"1.2.3.4")])
    assert client_address(headers, "10.0.0.9", 1) == "1.2.3.4"


# ----------------------------------------------------------------------------- admit


async def test_admit_with_auth_off_uses_the_client_address() -> None:
    policy = policy_for(app_args(policy={"rate_limit": {"requests_per_minute": 5}}))
    a = await policy.admit({"x-forwarded-for": "6.6.6.6"}, "10.0.0.1")
    assert (a.principal.id, a.subject, a.sticky) == ("anonymous", "ip:10.0.0.1", None)
    assert a.limits == RateLimitConfig(requests_per_minute=5)
    assert a.headers()["X-RateLimit-Remaining"] == "4"


async def test_admit_without_limits_has_no_headers() -> None:
    a = await policy_for(app_args()).admit({}, "10.0.0.1")
    assert a.decision is None and a.headers() == {}


async def test_session_header_is_the_sticky_seed() -> None:
    policy = policy_for(app_args(policy={"session_header": "X-Session"}))
    a = await policy.admit(Headers({"X-Session": "abc"}), "10.0.0.1")
    assert a.sticky == "abc"


async def test_admit_with_a_key() -> None:
    policy = policy_for(keyed_args())
    a = await policy.admit({"authorization": f"Bearer {USER_KEY}"}, "10.0.0.1")
    assert (a.principal.id, a.subject, a.sticky) == ("user", "key:user", "user")
    assert a.limits == RateLimitConfig(requests_per_minute=2)
    b = await policy.admit({"x-api-key": USER_KEY, "x-session-id": "s1"}, "10.0.0.1")
    assert b.sticky == "s1"


async def test_admit_without_a_key_is_401_before_any_rate_limit() -> None:
    policy = policy_for(keyed_args())
    with pytest.raises(Unauthorized):
        await policy.admit({}, "10.0.0.1")
    assert policy.limiter._local._logs == {}, "an unauthenticated request is not counted"


async def test_rate_limit_is_per_key_not_per_address() -> None:
    policy = policy_for(keyed_args())
    for peer in ("10.0.0.1", "10.0.0.2"):
        await policy.admit({"x-api-key": USER_KEY}, peer)
    with pytest.raises(RateLimited):
        await policy.admit({"x-api-key": USER_KEY}, "10.0.0.3")


async def test_a_keys_rate_limit_overrides_the_default() -> None:
    policy = policy_for(keyed_args())
    a = await policy.admit({"x-api-key": TOKEN_KEY}, "10.0.0.1")
    assert a.limits == RateLimitConfig(tokens_per_minute=100)
    for _ in range(5):  # no request limit for this key
        await policy.admit({"x-api-key": TOKEN_KEY}, "10.0.0.1")


async def test_spoofed_forwarded_for_does_not_change_the_subject() -> None:
    policy = policy_for(app_args(policy={"rate_limit": {"requests_per_minute": 2}}))
    await policy.admit({"x-forwarded-for": "1.1.1.1"}, "10.0.0.1")
    await policy.admit({"x-forwarded-for": "2.2.2.2"}, "10.0.0.1")
    with pytest.raises(RateLimited):
        await policy.admit({"x-forwarded-for": "3.3.3.3"}, "10.0.0.1")


async def test_trusted_hop_gives_each_client_its_own_bucket() -> None:
    policy = policy_for(app_args(policy={"rate_limit": {"requests_per_minute": 1}, "trusted_proxy_hops": 1}))
    a = await policy.admit({"x-forwarded-for": "1.1.1.1"}, "10.0.0.1")
    b = await policy.admit({"x-forwarded-for": "2.2.2.2"}, "10.0.0.1")
    assert (a.subject, b.subject) == ("ip:1.1.1.1", "ip:2.2.2.2")


# ----------------------------------------------------------------------------- budgets


def priced_args(**over: Any) -> AppArgs:
    models = [
        {"name": "qa", "program": "serve_app.examples:build_qa", "timeout_s": 2.0,
         "lm": {"model": "openai/sim-qa", "timeout_s": 1.0, "max_tokens": 500,
                "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0},
         "variants": [{"name": "a"}, {"name": "b", "lm": {"model": "openai/sim-b", "timeout_s": 1.0, "max_tokens": 100,
                                                          "input_usd_per_mtok": 10.0, "output_usd_per_mtok": 10.0}}],
         "budget": {"hard_usd": 1.0}},
        {"name": "classify", "program": "serve_app.examples:build_classifier", "timeout_s": 2.0,
         "lm": {"model": "openai/sim-unknown-price", "timeout_s": 1.0}},
    ]
    return app_args(models=models, **over)


def test_estimate_is_a_price_bound_per_variant() -> None:
    policy = policy_for(priced_args())
    qa = priced_args().model("qa")
    assert qa is not None
    scopes = policy.scopes(qa, policy.keys.authenticate({}))
    assert policy.estimate("qa.a", scopes) == pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6)
    assert policy.estimate("qa.b", scopes) == pytest.approx((1000 * 10.0 + 100 * 10.0) / 1e6)
    assert policy.estimate("classify", []) == 0.0  # unknown price


def test_estimate_prefers_a_configured_reservation() -> None:
    policy = policy_for(keyed_args())
    qa = policy.args.model("qa")
    assert qa is not None
    principal = policy.keys.authenticate({"x-api-key": TOKEN_KEY})
    scopes = policy.scopes(qa, principal)
    assert [s.name for s in scopes] == ["key:tokens"]
    assert policy.estimate("qa", scopes) == 0.25


async def test_estimate_follows_the_largest_cost_seen() -> None:
    policy = policy_for(priced_args())
    a = await policy.admit({}, "10.0.0.1")
    variant = policy.args.model("qa").served_variants()[0]  # type: ignore[union-attr]
    await policy.settle(None, variant, {"cost_usd": 0.01, "input_tokens": 1, "output_tokens": 1}, a)
    await policy.settle(None, variant, {"cost_usd": 0.005}, a)
    await policy.settle(None, variant, {"cost_usd": None}, a)
    assert policy.estimate("qa.a", []) == 0.01
    assert policy.estimate("qa.b", []) == pytest.approx(0.011), "another variant keeps its own estimate"


async def test_reserve_and_settle_enforce_the_model_budget() -> None:
    policy = policy_for(priced_args())
    a = await policy.admit({}, "10.0.0.1")
    qa = policy.args.model("qa")
    assert qa is not None
    variant = qa.served_variants()[0]
    r = await policy.reserve(qa, variant, a)
    assert r is not None and r.amount == pytest.approx(0.002)
    await policy.settle(r, variant, {"cost_usd": 0.4}, a)  # spent 0.4; the estimate is now 0.4
    r2 = await policy.reserve(qa, variant, a)
    assert r2 is not None and r2.amount == 0.4
    await policy.release(r2)
    await policy.settle(await policy.reserve(qa, variant, a), variant, {"cost_usd": 0.3}, a)  # spent 0.7
    with pytest.raises(BudgetExceeded):
        await policy.reserve(qa, variant, a)  # 0.7 spent + 0.4 estimate > 1.0


async def test_model_without_budget_reserves_nothing() -> None:
    policy = policy_for(priced_args())
    a = await policy.admit({}, "10.0.0.1")
    classify = policy.args.model("classify")
    assert classify is not None
    assert await policy.reserve(classify, classify.served_variants()[0], a) is None


async def test_settle_books_tokens_against_the_keys_token_limit() -> None:
    policy = policy_for(keyed_args())
    a = await policy.admit({"x-api-key": TOKEN_KEY}, "10.0.0.1")
    qa = policy.args.model("qa")
    assert qa is not None
    r = await policy.reserve(qa, qa.served_variants()[0], a)
    await policy.settle(r, qa.served_variants()[0], {"input_tokens": 60, "output_tokens": 50, "cost_usd": 0.1}, a)
    with pytest.raises(RateLimited):
        await policy.admit({"x-api-key": TOKEN_KEY}, "10.0.0.1")


async def test_key_budget_applies_across_models() -> None:
    policy = policy_for(keyed_args())
    a = await policy.admit({"x-api-key": TOKEN_KEY}, "10.0.0.1")
    qa, classify = policy.args.model("qa"), policy.args.model("classify")
    assert qa is not None and classify is not None
    for m in (qa, classify, qa, classify):  # 4 x 0.25 reserved of the key's $1
        await policy.reserve(m, m.served_variants()[0], a)
    with pytest.raises(BudgetExceeded, match="key:tokens"):
        await policy.reserve(classify, classify.served_variants()[0], a)


def test_order_uses_the_admissions_sticky_seed() -> None:
    args = app_args(models=[{"name": "qa", "program": "serve_app.examples:build_qa", "timeout_s": 2.0,
                             "lm": {"model": "openai/sim-qa", "timeout_s": 1.0},
                             "variants": [{"name": "a"}, {"name": "b"}]}])
    policy = policy_for(args, rand=lambda: 0.99)
    qa = args.model("qa")
    assert qa is not None
    from serve_app.policy import Admission
    from serve_app.keys import ANONYMOUS

    unseeded = Admission(ANONYMOUS, "ip:x", None, RateLimitConfig(), None)
    assert policy.order(qa, unseeded, None, set())[0].name == "b"  # rand 0.99
    picks = {policy.order(qa, Admission(ANONYMOUS, "ip:x", f"s{i}", RateLimitConfig(), None), None, set())[0].name
             for i in range(50)}
    assert picks == {"a", "b"}
