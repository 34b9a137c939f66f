"""Admission bench: the CPU cost of admit + settle on the hot path (allowance warm, no KV round trip),
and of a cache lookup. Run alone: `python -m tests.bench.bench_admission` (prints JSON)."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from aiohttp import web

from lockgate.config import Settings
from lockgate.llmwire import ApiRequest, Message
from lockgate.server.apikeys import ApiKey
from lockgate.services.router.admission import Admission
from lockgate.services.router.budgets import Allowance, Amount, period_id

N = 50_000


def _admission(policy: dict[str, Any]) -> Admission:
    path = Path(tempfile.mkdtemp()) / "gateway.yaml"
    path.write_text(yaml.safe_dump(policy))
    return Admission(Settings(gateway_file=str(path)), None)


async def _per_call_us(adm: Admission, body: bytes, cache: bool) -> float:
    key = ApiKey(id="k1", hash="", tenant="acme", app="shop")
    req = ApiRequest(model="gpt-4o-mini", messages=[Message(role="user", content="hello there")], max_tokens=64)
    rec = SimpleNamespace(status="ok", error_type="", input_tokens=5, output_tokens=20, cached_tokens=0,
                          attributes={}, response_model="", text="", finish_reason="")
    first = await adm.admit(key, "chat", "gpt-4o-mini", req, len(body))
    assert not isinstance(first, web.Response), first.text
    adm.settle(first, rec)
    t0 = time.perf_counter()
    for _ in range(N):
        ticket = await adm.admit(key, "chat", "gpt-4o-mini", req, len(body))
        if cache:
            await adm.lookup(ticket, "/chat/completions", "faq", "", body, rec, {})
        adm.settle(ticket, rec)
    return (time.perf_counter() - t0) / N * 1e6


async def main() -> dict[str, float]:
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello there"}],"temperature":0}'
    out: dict[str, float] = {}
    out["admit_settle_no_policy_us"] = await _per_call_us(Admission(Settings(), None), body, False)
    budgets = _admission({"budgets": {"day": {"tenant": "acme", "usd": 1e9}, "keys": {"per": "key", "tokens": 10**12}},
                          "rate_limits": [{"tenant": "acme", "rpm": 10**9, "tpm": 10**12}]})
    for counter in ("day", "keys.k1"):  # warm allowances: the hot path never leases here
        a = Allowance()
        a.add(Amount(10**18, 10**18), now=time.monotonic(), lease_s=3600, keep=Amount(10**18, 10**18))
        budgets.allowances[f"{counter}.{period_id('day', budgets.wall())}"] = a
    out["admit_settle_2_budgets_rate_limit_us"] = await _per_call_us(budgets, body, False)
    cached = _admission({"cache": {"deployments": {"faq": {"ttl_s": 60}}}})
    out["admit_lookup_settle_cache_us"] = await _per_call_us(cached, body, True)
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
