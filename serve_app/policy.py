"""Traffic policy at the router: who is calling, may they, how often, at what cost, which variant.

``TrafficPolicy`` joins the parts (``keys``, ``ratelimit``, ``budget``, ``variants``) behind the
few calls the router and the HTTP layer make:

- ``admit(headers, peer)``: authenticate (401) and rate-limit (429) one request; returns an
  ``Admission`` with the caller, the rate-limit subject, the sticky variant seed and the
  ``X-RateLimit-*`` headers.
- ``reserve(model, variant, admission)`` before an LM call: the budgets of the model and of
  the key (429 ``budget_exceeded``); ``settle(...)`` after it with the real usage (also books
  the tokens against the key's tokens-per-minute), ``release(...)`` when it failed.
- ``client_address(headers, peer)``: with ``trusted_proxy_hops`` = N, the entry N hops from
  the right of ``X-Forwarded-For`` (what the outermost trusted proxy saw); with 0, the
  connection's peer. The left-most entry is whatever the client wrote and is never trusted.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .budget import BudgetBook, BudgetScope, Reservation
from .config import AppArgs, ModelConfig, RateLimitConfig, Variant
from .keys import ANONYMOUS, KeyRing, Principal
from .metrics import Counters
from .policy_store import PolicyStore
from .ratelimit import Decision, RateLimiter
from .usage import resolve_prices
from .variants import VariantPicker

__all__ = ["TrafficPolicy", "Admission", "client_address", "OPEN_DOOR", "FORWARDED_PEER"]

# Tokens assumed for a prompt when bounding a call's cost before any call was seen.
_PROMPT_TOKENS_GUESS = 1000


@dataclass(frozen=True)
class Admission:
    principal: Principal
    subject: str
    sticky: str | None
    limits: RateLimitConfig
    decision: Decision | None

    def headers(self) -> dict[str, str]:
        return self.decision.headers() if self.decision is not None else {}


# The peer label when Serve's HTTP server already replaced the peer by an X-Forwarded-For
# entry (see client_address): one bucket for every such request, never one per header value.
FORWARDED_PEER = "forwarded-peer"


def _host(entry: str) -> str:
    """An X-Forwarded-For entry without its port (``1.2.3.4:80``, ``[::1]:80``)."""
    entry = entry.strip()
    if entry.startswith("["):
        return entry[1:].split("]", 1)[0]
    if entry.count(":") == 1:
        return entry.split(":", 1)[0]
    return entry


def client_address(headers: Mapping[str, str], peer: str | None, trusted_hops: int) -> str:
    """The client's address, trusting exactly ``trusted_hops`` proxies in front of Serve.

    With 0 hops the client is the connection's peer. Serve's HTTP server (uvicorn, with
    ``FORWARDED_ALLOW_IPS`` defaulting to loopback) replaces a loopback peer by the right-most
    X-Forwarded-For entry, which the client wrote: a peer that equals an entry of the header
    is therefore not trusted as an address, and all such requests share one bucket.
    """
    peer = peer or "unknown"
    # Several X-Forwarded-For lines are one comma-separated list (RFC 9110, 5.3).
    getlist = getattr(headers, "getlist", None)
    lines = getlist("x-forwarded-for") if getlist is not None else [headers.get("x-forwarded-for", "")]
    chain = [_host(p) for line in lines for p in line.split(",") if p.strip()]
    if trusted_hops <= 0:
        return FORWARDED_PEER if peer in chain else peer
    # The hops append right to left: the last trusted proxy's entry is chain[-1], and the
    # outermost trusted proxy wrote chain[-trusted_hops]: the address it saw connect.
    if len(chain) >= trusted_hops:
        return chain[-trusted_hops]
    return chain[0] if chain else peer


class TrafficPolicy:
    def __init__(
        self,
        args: AppArgs,
        store: PolicyStore,
        keys: KeyRing,
        *,
        wall: Callable[[], float] = time.time,
        counters: Counters | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.args = args
        self.store = store
        self.keys = keys
        self.counters = counters or Counters()
        self.limiter = RateLimiter(store, clock=wall, counters=self.counters)
        self.budgets = BudgetBook(store, wall=wall, counters=self.counters)
        self.picker = VariantPicker(rand)
        self._max_cost: dict[str, float] = {}
        self._bound: dict[str, float] = {}  # price bound of one call, per deployment, on first need

    # ---- admission -------------------------------------------------------------------

    async def admit(self, headers: Mapping[str, str], peer: str | None) -> Admission:
        principal = self.keys.authenticate(headers)
        if principal.authenticated:
            subject = f"key:{principal.id}"
        else:
            subject = f"ip:{client_address(headers, peer, self.args.policy.trusted_proxy_hops)}"
        limits = principal.rate_limit or self.args.policy.rate_limit
        decision = await self.limiter.check(subject, limits)
        sticky = headers.get(self.args.policy.session_header) or (principal.id if principal.authenticated else None)
        return Admission(principal, subject, sticky, limits, decision)

    def order(self, model: ModelConfig, admission: Admission, pinned: str | None,
              unhealthy: set[str]) -> list[Variant]:
        return self.picker.order(model, admission.sticky, pinned, unhealthy)

    # ---- budgets ---------------------------------------------------------------------

    def scopes(self, model: ModelConfig, principal: Principal) -> list[BudgetScope]:
        out = []
        if model.budget is not None:
            out.append(BudgetScope(f"model:{model.name}", model.budget))
        if principal.budget is not None:
            out.append(BudgetScope(f"key:{principal.id}", principal.budget))
        return out

    def estimate(self, deployment: str, scopes: list[BudgetScope]) -> float:
        """What to reserve for one call: a configured ``reserve_usd``, else the largest cost
        this replica has seen for the deployment, else a price-based bound of one call."""
        fixed = [s.config.reserve_usd for s in scopes if s.config.reserve_usd is not None]
        if fixed:
            return max(fixed)
        seen = self._max_cost.get(deployment)
        return seen if seen is not None else self._price_bound(deployment)

    def _price_bound(self, deployment: str) -> float:
        """The price of one call with a 1,000-token prompt and ``max_tokens`` of output
        (computed when a budget first needs it: apps without budgets never read the price
        table)."""
        bound = self._bound.get(deployment)
        if bound is None:
            bound = 0.0
            for model in self.args.models:
                for v in model.served_variants():
                    if v.deployment == deployment:
                        lm = model.for_variant(v.name).lm
                        prices = resolve_prices(lm)
                        bound = prices.cost(_PROMPT_TOKENS_GUESS, lm.max_tokens) if prices else 0.0
            self._bound[deployment] = bound
        return bound

    async def reserve(self, model: ModelConfig, variant: Variant, admission: Admission) -> Reservation | None:
        scopes = self.scopes(model, admission.principal)
        if not scopes:
            return None
        return await self.budgets.reserve(scopes, self.estimate(variant.deployment, scopes))

    async def settle(self, reservation: Reservation | None, variant: Variant, usage: Mapping[str, Any],
                     admission: Admission) -> None:
        """Book a finished LM call: budgets (real cost), tokens per minute, the cost estimate."""
        cost = usage.get("cost_usd")
        if cost is not None and cost > self._max_cost.get(variant.deployment, 0.0):
            self._max_cost[variant.deployment] = float(cost)
        await self.budgets.settle(reservation, float(cost or 0.0))
        tokens = int(usage.get("input_tokens") or 0) + int(usage.get("output_tokens") or 0)
        await self.limiter.add_tokens(admission.subject, admission.limits, tokens)

    async def release(self, reservation: Reservation | None) -> None:
        await self.budgets.release(reservation)


# The admission of a request when no policy is attached (unit tests, internal calls).
OPEN_DOOR = Admission(ANONYMOUS, "anonymous", None, RateLimitConfig(), None)
