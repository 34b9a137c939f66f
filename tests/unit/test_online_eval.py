"""Online evaluation: deterministic sampling, reference-free scores, and scores as analysis metrics."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from lockgate.config import Settings
from lockgate.contracts import InferenceEvent
from lockgate.contracts.inference import SECRETS_MASKED
from lockgate.errors import ConfigError
from lockgate.gitops.documents import GitopsError, load_folder
from lockgate.gitops.resolve import resolve
from lockgate.onlineeval import OnlineEvalSpec
from lockgate.redact import scrub_event
from lockgate.services.evaluator import online, online_handler, safety
from lockgate.services.router.analysis import AnalysisSpec, MetricSpec, VariantSample, describe, measure
from lockgate.services.router.fit import encode_served
from lockgate.subjects import untoken

pytestmark = pytest.mark.timeout(30)


def _event(i: int, response: str | None = "hello", status: str = "ok") -> InferenceEvent:
    return InferenceEvent(id=f"01941f29-7c00-7000-8000-{i:012x}", app="shop", deployment="chat", release="r2",
                          variant="canary", response=response, status=status, trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
                          time=datetime(2026, 12, 3, 14, 0, tzinfo=UTC))


def test_sampling_is_deterministic_by_event_id_and_near_its_rate() -> None:
    ids = [f"01941f29-7c00-7000-8000-{i:012x}" for i in range(4000)]
    picked = [online.sampled(i, 0.1) for i in ids]
    assert picked == [online.sampled(i, 0.1) for i in ids]  # every replica and redelivery agrees
    assert 300 <= sum(picked) <= 500
    assert all(online.sampled(i, 1.0) for i in ids[:10]) and not any(online.sampled(i, 0.0) for i in ids[:10])


def _plan(names: tuple[str, ...], rate: float = 1.0) -> online.Plan:
    return online.plan(None, rate, names)


def test_scores_of_an_answer_and_none_for_errors() -> None:
    scored = online.score(_event(1, "write to jane.doe@example.com"), _plan(("pii_free", "refusal", "length")))
    assert scored is not None and scored.event_id == _event(1).id and scored.release == "r2"
    assert scored.scores == {"pii_free": 0.0, "refusal": 0.0, "length": 29.0}
    assert [(r.scorer, r.value, r.error) for r in scored.results] == [
        ("pii_free", 0.0, ""), ("refusal", 0.0, ""), ("length", 29.0, "")]
    assert scored.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and scored.variant == "canary" and scored.time == _event(1).time
    assert online.score(_event(2, "I'm sorry, but I can't help with that"), _plan(("refusal",))).scores == {  # type: ignore[union-attr]
        "refusal": 1.0}
    assert online.score(_event(3, None, status="error"), _plan(("length",))) is None
    with pytest.raises(ConfigError, match="exact_match cannot score live traffic"):
        online.check(("pii_free", "exact_match"))
    with pytest.raises(ConfigError, match="regex need params: declare them in a deployment"):
        online.check(("regex",))


def _spec(**raw: object) -> OnlineEvalSpec:
    return msgspec.convert(raw, OnlineEvalSpec)


KEY = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx0123456789"


def _served(event: InferenceEvent) -> InferenceEvent:
    """The event as the evaluator reads it from the router: published by `encode_served`, scrubbed at the bus edge."""
    return scrub_event(msgspec.json.decode(encode_served(event).data, type=InferenceEvent))


def test_secrets_the_router_masked_in_an_answer_count_for_pii_free_and_a_prompts_never() -> None:
    plan = online.plan(_spec(scorers=["pii_free", {"name": "pii_free", "params": {"kinds": ["email"]}, "as": "mail"},
                                      {"name": "pii_free", "params": {"kinds": ["jwt", "phone"]}, "as": "tokens"},
                                      {"name": "pii_free", "params": {"kinds": ["aws_access_key"]}, "as": "aws"}]),
                       1.0, ())
    leak = _served(msgspec.structs.replace(_event(1, f"use {KEY} or AKIAIOSFODNN7EXAMPLE"), prompt="hi"))
    # Counts by kind, never the secret.
    assert KEY not in (leak.response or "") and leak.attributes[SECRETS_MASKED] == "api_key:1,aws_access_key:1"
    # Each masked secret is a finding of its kind: the scorers' kinds apply as they would to the raw answer.
    want = {"pii_free": 0.0, "mail": 1.0, "tokens": 1.0, "aws": 0.0}
    assert online.score(leak, plan).scores == want  # type: ignore[union-attr]
    # A key in the prompt is masked too, but it is the user's, not the answer's.
    asked = _served(msgspec.structs.replace(_event(2, "I cannot check keys"), prompt=f"is {KEY} valid?"))
    assert KEY not in (asked.prompt or "") and SECRETS_MASKED not in asked.attributes
    clean = {"pii_free": 1.0, "mail": 1.0, "tokens": 1.0, "aws": 1.0}
    assert online.score(asked, plan).scores == clean  # type: ignore[union-attr]
    # The count is the router's scrub's alone: one the event held before is dropped, and an answer holding the
    # marker's text masks nothing.
    held = msgspec.structs.replace(_event(3, "it said [REDACTED] there"), attributes={SECRETS_MASKED: "api_key:7"})
    assert SECRETS_MASKED not in _served(held).attributes
    assert online.masked_secrets(_served(held)) == {}
    # An application's own counts that are no counts are none (its own events' scores are all it could change).
    for value in ("x", "²", "-1", "9" * 40, "", "2", "api_key:0", "api_key:9" + "9" * 18, "email:1", "api_key:",
                  "api_key:1,api_key:2", "api_key:1,", "api_key:1,pwned:1", "API_KEY:1", " api_key:1"):
        event = msgspec.structs.replace(_event(4), attributes={SECRETS_MASKED: value})
        assert online.masked_secrets(event) == {}, value
        assert online.score(event, plan).scores == clean, value  # type: ignore[union-attr]
    event = msgspec.structs.replace(_event(5), attributes={SECRETS_MASKED: "jwt:1,private_key:2"})
    assert online.masked_secrets(event) == {"jwt": 1, "private_key": 2}
    assert online.score(event, plan).scores == {**clean, "pii_free": 0.0, "tokens": 0.0}  # type: ignore[union-attr]


# Code samples as assistants answer them: the scrub masks each credential a keyword names, none of them a secret of a
# kind pii_free looks for (placeholders, defaults, a URL's `user:pass@`).
PLACEHOLDER_CODE = ('Here is how to call it:\n```python\nclient = OpenAI(api_key="YOUR_API_KEY")\n'
                    'db = connect(host="localhost", user="postgres", password="password")\n'
                    'headers = {"X-Api-Key": "abc123"}\nDATABASE_URL = "postgres://user:pass@localhost:5432/db"\n```')


def test_placeholder_credentials_the_router_masked_are_no_secrets_to_pii_free() -> None:
    # Before, probe p71 F3: each of the four masks counted (lockgate.secrets_masked "4"), and pii_free scored the
    # answer 0 where the raw answer scores 1.
    plan = online.plan(_spec(scorers=["pii_free"]), 1.0, ())
    served = _served(_event(1, PLACEHOLDER_CODE))
    assert "YOUR_API_KEY" not in (served.response or "") and "abc123" not in (served.response or "")  # masked
    assert SECRETS_MASKED not in served.attributes
    assert safety.pii_free(PLACEHOLDER_CODE, None, {}) == 1.0  # what the raw answer scores
    assert online.score(served, plan).scores == {"pii_free": 1.0}  # type: ignore[union-attr]
    # A real key among them is counted, of its kind alone.
    leak = _served(_event(2, PLACEHOLDER_CODE + f"\nor client = OpenAI(api_key=\"{KEY}\")"))
    assert leak.attributes[SECRETS_MASKED] == "api_key:1"
    assert online.score(leak, plan).scores == {"pii_free": 0.0}  # type: ignore[union-attr]


def test_rates_per_variant_fall_back_to_default_then_the_global_rate() -> None:
    p = online.plan(_spec(sample={"canary": 0.5, "stable": 0.05}), 0.1, ("length",))
    assert (p.rate("canary"), p.rate("stable"), p.rate("shadow")) == (0.5, 0.05, 0.1)
    assert online.plan(_spec(sample={"canary": 1.0, "default": 0.0}), 0.1, ("length",)).rate("shadow") == 0.0
    assert online.plan(None, 0.2, ("length",)).rate("canary") == 0.2
    ids = [f"01941f29-7c00-7000-8000-{i:012x}" for i in range(2000)]
    canary = sum(online.chosen(msgspec.structs.replace(_event(i), id=e), p) for i, e in enumerate(ids))
    stable = sum(online.chosen(msgspec.structs.replace(_event(i), id=e, variant="stable"), p) for i, e in enumerate(ids))
    assert 850 <= canary <= 1150 and 60 <= stable <= 140
    assert not online.plan(_spec(sample={"canary": 0.0}), 0.0, ()).active


def test_regex_and_json_schema_scorers_take_their_params_and_named_scores() -> None:
    spec = _spec(scorers=[{"name": "regex", "params": {"pattern": "^[A-Z]"}, "as": "capitalised"},
                          {"name": "json_schema", "params": {"schema": {"type": "object", "required": ["answer"]}}},
                          "json_valid"])
    p = online.plan(spec, 1.0, ("length",))
    good = online.score(_event(4, '{"answer": 42}'), p)
    assert good is not None and good.scores == {"capitalised": 0.0, "json_schema": 1.0, "json_valid": 1.0}
    other = online.score(_event(5, '{"other": 1}'), p)
    assert other is not None and other.scores == {"capitalised": 0.0, "json_schema": 0.0, "json_valid": 1.0}
    assert online.score(_event(6, "Hello"), p).scores["capitalised"] == 1.0  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="deployment chat online_eval: scorer regex: regex: invalid pattern"):
        online.plan(_spec(scorers=[{"name": "regex", "params": {"pattern": "("}}]), 1.0, (), where="deployment chat online_eval")


@pytest.mark.parametrize(("raw", "part"), [
    ({"scorers": ["exact_match"]}, "cannot score live traffic"),
    ({"scorers": [{"name": "regex"}]}, "needs params.pattern"),
    ({"scorers": [{"name": "json_schema", "params": {"schema": "x"}}]}, "must be a JSON Schema object"),
    ({"scorers": ["length", "length"]}, "named twice"),
    # A metric reading `score json_valid` must be that scorer: a regex matching everything named so always passed.
    ({"scorers": [{"name": "regex", "params": {"pattern": "(?s)"}, "as": "json_valid"}]}, "another scorer's name"),
    ({"sample": {"canary": 1.5}}, "Expected `float` <= 1"),
    ({"judge": {"endpoint": "j", "model": "m"}}, "missing required field `rubric`"),
])
def test_bad_online_eval_documents_are_refused_naming_what(raw: dict, part: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=part):
        msgspec.convert(raw, OnlineEvalSpec)


def test_a_judge_outage_is_an_error_result_read_as_nan_never_a_low_score() -> None:
    spec = _spec(judge={"endpoint": "judge", "model": "m", "rubric": "polite?", "sample": 1.0})
    p = online.plan(spec, 1.0, ("length",))
    assert online.wants_judge(_event(7), p, served=True) and not online.wants_judge(_event(8, None, status="error"), p,
                                                                                    served=True)
    down = online.judged(_event(7), None, "judge endpoint judge: HTTP 503")
    assert down.scores == {} and [(r.scorer, r.value, r.error) for r in down.results] == [
        ("llm_judge", None, "judge endpoint judge: HTTP 503")]
    assert math.isnan(down.measured()["llm_judge"])
    leaked = online.judged(_event(7), None, "HTTP 401: bad key sk-proj-abcdefghijklmnopqrstuvwxyz0123456789 and more" + " text" * 100)
    assert "sk-proj-abcdefghij" not in leaked.results[0].error and len(leaked.results[0].error) == online.MAX_ERROR
    up = online.judged(_event(7), 0.75)
    assert up.measured() == {"llm_judge": 0.75} and up.results[0].error == ""


def test_only_generated_answers_a_router_served_are_judged_and_cache_hits_are_not_scored() -> None:
    # The judge spends the operator's budget and feeds canary analysis: an application's own events (which may
    # name any deployment) are scored by the deterministic scorers (marked not served), never judged.
    p = online.plan(_spec(judge={"endpoint": "judge", "model": "m", "rubric": "polite?", "sample": 1.0}), 1.0,
                    ("length",))
    assert online.wants_judge(_event(7), p, served=True) and not online.wants_judge(_event(7), p, served=False)
    sent = online.score(_event(7), p, served=False)
    assert sent is not None and sent.served is False
    # A cache hit replays an earlier answer: no new evidence of the release, so neither scored nor judged.
    hit = msgspec.structs.replace(_event(7), attributes={"cache": "hit", "cost_saved": "0.000001000"})
    assert online.score(hit, p, served=True) is None and not online.wants_judge(hit, p, served=True)
    miss = msgspec.structs.replace(_event(7), attributes={"cache": "miss"})
    assert online.score(miss, p, served=True) is not None and online.wants_judge(miss, p, served=True)


def _sample(n: int, **scores: list[float]) -> VariantSample:
    return VariantSample(n=n, latency_ms=[1.0] * n, scores=scores)


def test_score_metric_fails_a_canary_whose_score_dropped_naming_value_and_threshold() -> None:
    spec = AnalysisSpec(metrics=[MetricSpec(name="score", scorer="pii_free", max_decrease=0.01)], min_sample=100)
    leaky = _sample(200, pii_free=[1.0] * 60 + [0.0] * 40)
    clean = _sample(200, pii_free=[1.0] * 100)
    m = measure(spec, leaky, clean, look=1)
    assert m.verdict == "FAILED"
    r = m.metrics[0]
    assert (r.name, r.canary, r.stable, r.threshold) == ("score:pii_free", 0.6, 1.0, 0.99)
    assert describe(r).startswith("score:pii_free 0.6 < threshold 0.99 (stable 1; 100 canary vs 100 stable scores compared)")
    assert measure(spec, clean, clean, look=1).verdict == "SUCCESSFUL"


def test_too_few_scores_wait_and_no_scores_never_pass() -> None:
    spec = AnalysisSpec(metrics=[MetricSpec(name="score", scorer="pii_free", min=0.9, min_scores=30)], min_sample=100)
    assert measure(spec, _sample(200, pii_free=[1.0] * 10), _sample(200), look=1).verdict == "WAITING"
    assert measure(spec, _sample(200), _sample(200), look=1).verdict == "WAITING"  # e.g. online eval is off
    assert measure(spec, _sample(200, pii_free=[1.0] * 30), _sample(200), look=1).verdict == "SUCCESSFUL"


def test_lower_is_better_scores_use_the_ceiling_limits() -> None:
    spec = AnalysisSpec(metrics=[MetricSpec(name="score", scorer="length", max_ratio=2.0)], min_sample=100)
    tripled = _sample(200, length=[30.0 + i % 3 for i in range(100)])
    plain = _sample(200, length=[10.0 + i % 3 for i in range(100)])
    m = measure(spec, tripled, plain, look=1)
    assert m.verdict == "FAILED" and describe(m.metrics[0]).startswith("score:length 30.99 > threshold 21.98 (stable 10.99; 100 canary vs 100 stable scores compared)")


def test_score_metrics_are_checked_when_decoded() -> None:
    for bad, part in (({"name": "score", "min": 0.9}, "name its scorer"),
                      ({"name": "score", "scorer": "x", "min": 0.9, "max": 3}, "not both"),
                      ({"name": "error_rate", "min": 0.9}, "are for score metrics")):
        with pytest.raises(msgspec.ValidationError, match=part):
            msgspec.convert(bad, MetricSpec)


def test_judge_errors_make_the_score_inconclusive_never_a_pass_or_a_failure() -> None:
    spec = AnalysisSpec(metrics=[MetricSpec(name="score", scorer="llm_judge", max_decrease=0.1, min_scores=30)],
                        min_sample=100)
    nan = math.nan
    down = measure(spec, _sample(200, llm_judge=[nan] * 80), _sample(200, llm_judge=[nan] * 80), look=1)
    assert down.verdict == "INCONCLUSIVE" and down.metrics[0].verdict == "INCONCLUSIVE"
    assert "scorer errors (80 canary, 80 stable)" in describe(down.metrics[0])
    # A few scores before the outage: still no pass and no abort, even when those few look bad.
    few = measure(spec, _sample(200, llm_judge=[0.0] * 10 + [nan] * 70), _sample(200, llm_judge=[1.0] * 40),
                  look=1)
    assert few.metrics[0].verdict == "INCONCLUSIVE"
    # Mostly errors: the scores that did arrive are not a fair sample.
    most = measure(spec, _sample(200, llm_judge=[1.0] * 40 + [nan] * 60), _sample(200, llm_judge=[1.0] * 40),
                   look=1)
    assert most.metrics[0].verdict == "INCONCLUSIVE"
    # A blip (a few errors among enough scores) is judged on the scores, NaN left out.
    blip = measure(spec, _sample(200, llm_judge=[1.0] * 60 + [nan] * 3), _sample(200, llm_judge=[1.0] * 60),
                   look=1)
    assert blip.verdict == "SUCCESSFUL" and blip.metrics[0].canary_n == 60
    # No errors and too few scores: waiting, as before.
    assert measure(spec, _sample(200, llm_judge=[1.0] * 5), _sample(200), look=1).verdict == "WAITING"


def _folder(tmp_path: Path, online_eval: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "model.yaml").write_text("kind: model_config\nname: sim\nspec: {model: m, endpoint: default}\n")
    (tmp_path / "r1.yaml").write_text("kind: release\nname: r1\nrelease: r1\napp: shop\nartifacts: [model_config/sim]\n")
    (tmp_path / "chat.yaml").write_text("kind: deployment\nname: chat\napp: shop\nstable: r1\n" + online_eval)
    return tmp_path


def test_online_eval_is_part_of_the_deployment_document_and_of_its_digest_only_when_given(tmp_path: Path) -> None:
    plain = {r.key: r for r in resolve(load_folder(_folder(tmp_path / "a", "")))}["deployment/chat"]
    assert "online_eval" not in plain.spec  # a deployment applied before online_eval existed is unchanged
    doc = "online_eval:\n  sample: {canary: 0.5, stable: 0.05}\n  scorers: [pii_free]\n"
    given = {r.key: r for r in resolve(load_folder(_folder(tmp_path / "b", doc)))}["deployment/chat"]
    assert given.spec["online_eval"]["sample"] == {"canary": 0.5, "stable": 0.05} and given.digest != plain.digest
    spec = msgspec.convert(given.spec["online_eval"], OnlineEvalSpec)  # what the evaluator reads back
    assert online.plan(spec, 0.0, ()).rate("canary") == 0.5


def test_a_bad_online_eval_is_refused_at_plan_time_naming_file_and_path(tmp_path: Path) -> None:
    with pytest.raises(GitopsError, match=r"chat.yaml is invalid: scorer regex needs params.pattern - at "
                                          r"`\$.online_eval.scorers\[0\]`"):
        load_folder(_folder(tmp_path, "online_eval:\n  scorers: [{name: regex}]\n"))


def _documents(monkeypatch: pytest.MonkeyPatch, plans: online_handler.Plans, documented: Callable[[str], bool],
               reads: list[str] | None = None) -> None:
    """The applied state as `plans` reads it: the deployments `documented` says have a document (listed), and their
    documents (read one at a time, each read noted in `reads`): chat's samples stable answers, the others are empty."""
    class Listed:
        def __contains__(self, key: object) -> bool:
            return isinstance(key, str) and key.startswith("deployment.") and documented(untoken(key[11:]))

    async def listed() -> Any:
        return Listed()

    async def spec(deployment: str) -> tuple[OnlineEvalSpec | None, str]:
        assert documented(deployment), "read a document the listing does not name"
        (reads if reads is not None else []).append(deployment)
        return (OnlineEvalSpec(sample={"stable": 1.0}), "") if deployment == "chat" else (None, "")

    monkeypatch.setattr(plans, "_documented", listed)
    monkeypatch.setattr(plans, "_spec", spec)


async def test_the_evaluators_plans_are_bounded_least_recently_used_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deployments with an applied document (their names are the operator's): at most PLANS_MAX plans are kept; a
    deployment in use keeps its plan, and one whose plan went reads it again."""
    plans = online_handler.Plans(SimpleNamespace(settings=Settings()))  # type: ignore[arg-type]
    reads: list[str] = []
    _documents(monkeypatch, plans, lambda name: True, reads)
    chat = await plans.get("chat")
    for i in range(3 * online_handler.PLANS_MAX):
        await plans.get(f"other-{i}")
        if i % 50 == 0:
            assert await plans.get("chat") is chat  # in use: kept (one read in all)
    assert len(plans._cache) == online_handler.PLANS_MAX and reads.count("chat") == 1
    assert "other-0" not in plans._cache
    await plans.get("other-0")  # its plan went: read again
    assert reads.count("other-0") == 2


async def test_a_deployment_without_a_document_is_neither_read_nor_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """An application's events may name any deployment: each made-up name read its missing document, past the
    PLANS_MAX names kept at every event (probe p55 F1). One without a document (not listed) gets the global plan,
    with no read and nothing kept."""
    plans = online_handler.Plans(SimpleNamespace(settings=Settings()))  # type: ignore[arg-type]
    reads: list[str] = []
    _documents(monkeypatch, plans, lambda name: name == "chat", reads)
    for _ in range(2):
        for i in range(2 * online_handler.PLANS_MAX):
            assert await plans.get(f"made-up-{i}", "evil") is plans.default
    assert reads == [] and not plans._cache
    assert await plans.get("chat") is not plans.default and reads == ["chat"]


@pytest.mark.parametrize("owner", ["acme", ""])
async def test_a_deployments_document_is_its_own_tenants_plan(monkeypatch: pytest.MonkeyPatch, owner: str) -> None:
    """Probe p25 F2b: another tenant's answers under a deployment's name (the default route's, under passthrough)
    were judged on its document's judge, within its budget. The document is its stable release's tenant's: another
    tenant's events get the global plan, as a deployment nobody configured; a tenant not known constrains nothing."""
    plans = online_handler.Plans(SimpleNamespace(settings=Settings()))  # type: ignore[arg-type]

    async def spec(deployment: str) -> tuple[OnlineEvalSpec | None, str]:
        return OnlineEvalSpec(sample={"stable": 1.0}), "r1"

    async def tenant_of(release: str) -> str:
        assert release == "r1"
        return owner

    _documents(monkeypatch, plans, lambda name: True)
    monkeypatch.setattr(plans, "_spec", spec)
    monkeypatch.setattr(plans, "_owner", tenant_of)
    document = await plans.get("chat")  # an answer the deployment's own route served
    assert document is not plans.default and await plans.get("chat", "acme") is document
    assert await plans.get("chat", "gitshop") is (plans.default if owner else document)


def test_an_answers_scores_message_id_is_its_own_whoever_chose_its_id() -> None:
    """The Nats-Msg-Id of an answer's scores names its whole (tenant, app, served, event id) and kind, so no other
    answer's scores take it (probe p47 F1: `scored-{tenant}-{id}` was shared by another app's event under the same id,
    and by tenant `acme`'s `corp-x` with tenant `acme-corp`'s `x`); the same answer's re-score keeps it."""
    from lockgate.contracts import InferenceScored

    def scored(tenant: str, app: str, event_id: str, served: bool = False) -> InferenceScored:
        return InferenceScored(event_id=event_id, tenant=tenant, app=app, served=served)

    answers = [scored("acme", "app1", "order-1"), scored("acme", "app2", "order-1"), scored("acme", "corp", "corp-x"),
               scored("acme-corp", "app1", "x"), scored("acme", "app1", "order-1", served=True)]
    ids = [online.message_id(a, kind) for a in answers for kind in (online.SCORED, online.JUDGE)]
    assert len(set(ids)) == len(ids)
    assert online.message_id(scored("acme", "app1", "order-1"), online.SCORED) == ids[0]
