"""Header routes (canary `set_header_route` steps and blue-green previews) on the real nats-server, chDB, simulator and
router HTTP: only a tester's key (admin, or one the route names) is sent to the candidate by its header; any other
key's request is routed as if it had no header. Found by a probe (s3): any app key of the tenant sent the header on
the requests it wanted judged as the candidate's and aborted a healthy canary or preview at will."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest

from lockgate.contracts.inference import ROUTED_BY
from lockgate.server.apikeys import Bootstrap, KeyStore
from lockgate.signing import Signer
from tests.integration import test_rollout_analysis as analysis_tests
from tests.integration.test_rollout_analysis import _events, _pass, _start

# The router stack of the analysis tests: stable answers "stable says hi", release `same` "same canary".
router, http, keys, signer = analysis_tests.router, analysis_tests.http, analysis_tests.keys, analysis_tests.signer

pytestmark = pytest.mark.timeout(120)
TESTER = {"x-lockgate-canary": "always"}
PREVIEW = {"x-lockgate-preview": "always"}
LONG = "Please consider the following very long context. " * 60


async def _answers(router: Any, key: str, n: int, headers: dict[str, str], prompt: str = "hi",
                   tag: str = "u") -> list[str]:
    """The answers' texts to n chat requests from distinct users, sent with the official openai client."""
    client = openai.AsyncOpenAI(api_key=key, base_url=f"{router.url}/v1", max_retries=0)
    try:
        async def one(i: int) -> str:
            answer = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": prompt}], extra_headers=headers,
                extra_body={"user": f"{tag}-{i}"})
            return answer.choices[0].message.content or ""

        return list(await asyncio.gather(*(one(i) for i in range(n))))
    finally:
        await client.close()


async def test_a_header_route_sends_only_tester_keys_to_the_canary_and_marks_their_events(
        router: Any, http: aiohttp.ClientSession, signer: Signer, keys: Bootstrap) -> None:
    store = KeyStore(router.ctx.settings.home)
    app_key, app = store.create("default", "shop", description="an ordinary client that sends the header")
    tester_key, tester = store.create("default", "shop", description="an internal tester")
    bus = router.ctx.bus
    sub = await bus.nc.subscribe(bus.subjects.served("shop", "default"))
    await _start(http, router, "same", {"steps": [{"set_header_route": {"keys": [tester.id]}}, {"pause": {}}, 50],
                                        "interval_s": 0.1})
    await _pass(router, signer, "same")
    assert router.rollouts.route("chat").weight == 0.0
    # An app key the route does not name: its header is ignored (weight 0: stable), never an error.
    assert set(await _answers(router, app_key, 20, TESTER, tag="app")) == {"stable says hi"}
    assert set(await _answers(router, tester_key, 20, TESTER, tag="tester")) == {"same canary"}
    assert set(await _answers(router, keys.admin_key, 20, TESTER, tag="admin")) == {"same canary"}
    assert set(await _answers(router, keys.admin_key, 20, {}, tag="plain")) == {"stable says hi"}

    seen: dict[tuple[str, str, str], int] = {}
    while sum(seen.values()) < 80:
        for e in _events.decode((await sub.next_msg(timeout=10)).data):
            seen_as = ({app.id: "app", tester.id: "tester"}.get(e.key_id, "admin"), e.variant,
                       e.attributes.get(ROUTED_BY, ""))
            seen[seen_as] = seen.get(seen_as, 0) + 1
    await sub.unsubscribe()
    assert seen == {("app", "stable", ""): 20, ("tester", "canary", "header"): 20,
                    ("admin", "canary", "header"): 20, ("admin", "stable", ""): 20}


async def test_an_app_key_sending_the_preview_header_cannot_abort_a_healthy_blue_green_preview(
        router: Any, http: aiohttp.ClientSession, signer: Signer) -> None:
    # As the probe did: the attacker sends long prompts with the preview's header and short ones without, so the
    # preview's evidence (on its key, and as a whole) would cost far more tokens than stable's.
    store = KeyStore(router.ctx.settings.home)
    app_key, _ = store.create("default", "shop", description="sends long prompts with the preview header")
    tester_key, tester = store.create("default", "shop", description="an internal tester")
    analysis = {"metrics": [{"name": "tokens_per_request", "max_ratio": 1.5}], "min_sample": 30}
    await _start(http, router, "same", {"interval_s": 0.1, "blue_green": {
        "preview": {"keys": [tester.id]}, "auto_promotion_s": 1, "pre_promotion_analysis": analysis}})
    await _pass(router, signer, "same")
    assert f"from admin keys and key {tester.id}" in router.rollouts.route("chat").reason
    while_previewed: set[tuple[str, str]] = set()  # (who, answer) of the rounds all served while the preview was
    for rounds in range(40):
        if router.rollouts.route("chat").phase in ("promoted", "aborted"):
            break
        answers = await asyncio.gather(_answers(router, app_key, 5, PREVIEW, LONG, tag=f"a{rounds}"),
                                       _answers(router, app_key, 5, {}, tag=f"b{rounds}"),
                                       _answers(router, tester_key, 5, PREVIEW, tag=f"t{rounds}"),
                                       _answers(router, tester_key, 5, {}, tag=f"s{rounds}"))
        if router.rollouts.route("chat").phase == "progressing":  # the whole round was (promotion moves everyone)
            while_previewed |= {("app", a) for a in answers[0]} | {("tester", a) for a in answers[2]}
    await router.rollouts.wait_for(lambda r: r["chat"].phase in ("promoted", "aborted"), timeout=30)
    route = router.rollouts.route("chat")
    assert (route.phase, route.stable.release) == ("promoted", "same"), route.reason
    # The app key's header was ignored (stable served it); the tester's reached the preview.
    assert while_previewed == {("app", "stable says hi"), ("tester", "same canary")}
