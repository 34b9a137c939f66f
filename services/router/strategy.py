"""A deployment's own rollout strategy (canary steps, blue-green, shadow) and its analysis status. Pure, no I/O."""

from __future__ import annotations

from typing import Annotated

import msgspec

from lockgate.server.apikeys import ROUTE_CHANGERS
from lockgate.services.router.analysis import AnalysisSpec, Measurement

Percent = Annotated[float, msgspec.Meta(gt=0, le=100)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=7 * 86_400)]
HeaderName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9-]{1,64}$")]
KeyId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]  # an API key's id, never the key
# The roles whose keys a header route always honours: those that may change the route anyway. Of them only an admin
# key sends traffic (apikeys.SENDERS); an app key tests only when the route names it.
TESTER_ROLES: tuple[str, ...] = ROUTE_CHANGERS


class HeaderRoute(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Requests carrying `header: value` go to the candidate whatever the weight: internal testers' requests only.

    A tester is an admin key (TESTER_ROLES) or a key named in `keys` (its id, as `lockgate keys list` shows it).
    Any other key's request is routed as if the header were absent: before, any app key could send the header on
    requests it wanted judged as the candidate's (long prompts, `max_tokens: 1`) and abort a healthy canary or
    blue-green preview at will, with no arm to learn (README, threat model)."""

    header: HeaderName = "x-lockgate-canary"
    value: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] = "always"
    keys: Annotated[tuple[KeyId, ...], msgspec.Meta(max_length=100)] = ()

    def __post_init__(self) -> None:
        # Header names are case-insensitive: compare them in one case.
        msgspec.structs.force_setattr(self, "header", self.header.lower())

    def matches(self, headers: object) -> bool:
        """True when the request's headers (a mapping) carry the configured value exactly."""
        get = getattr(headers, "get", None)
        return get is not None and get(self.header) == self.value

    def testers(self) -> str:
        """Whose requests it routes, for a rollout's reason."""
        return "admin keys" + (f" and key{'s' * (len(self.keys) > 1)} {', '.join(self.keys)}" if self.keys else "")

    def honours(self, headers: object, key_id: str, role: str) -> bool:
        """True when the request carries the header and its API key (id, role) may test the candidate."""
        return (role in TESTER_ROLES or (bool(key_id) and key_id in self.keys)) and self.matches(headers)


class Preview(HeaderRoute, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A blue-green preview's header route: the same, with the preview's own header by default (a spec that names
    only its `keys` or `value` keeps `x-lockgate-preview`)."""

    header: HeaderName = "x-lockgate-preview"


class Pause(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Hold the weight for `duration_s`, or (without it) until an operator approves it (`rollout approve`)."""

    duration_s: Seconds | None = None


class Step(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One canary step, exactly one kind: `set_weight`, `pause` or `set_header_route` (Argo's step kinds).

    A plain number in `steps` is a `set_weight` step.
    """

    set_weight: Percent | None = None
    pause: Pause | None = None
    set_header_route: HeaderRoute | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("set_weight", "pause", "set_header_route") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a step has exactly one of set_weight, pause, set_header_route (got {given or 'none'})")


class BlueGreen(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The candidate is a preview that gets traffic only by header (or shadow) until promoted, all at once.

    Promotion is manual, or automatic `auto_promotion_s` after the preview went live once the
    pre-promotion analysis (if any) passed. After promotion the post-promotion analysis (if any)
    compares the new release with the old one's evidence and rolls back on failure; the old release
    stays routable for `scale_down_delay_s`, during which `abort`/`undo` swap it back instantly.
    """

    preview: Preview = Preview()
    auto_promotion_s: Seconds | None = None
    pre_promotion_analysis: AnalysisSpec | None = None
    post_promotion_analysis: AnalysisSpec | None = None
    scale_down_delay_s: Annotated[float, msgspec.Meta(ge=0, le=7 * 86_400)] = 30.0


class ShadowSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Mirror a sampled share of live (stable-served) requests to the candidate, never answering users with it.

    Budgets: `max_rps` (token bucket, burst of one second), `max_concurrency` calls in flight,
    `max_requests` and `max_cost_usd` over the rollout; a request over any budget is simply not mirrored.
    """

    sample: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.1  # share of requests mirrored
    max_rps: Annotated[float, msgspec.Meta(gt=0, le=10_000)] = 5.0
    max_concurrency: Annotated[int, msgspec.Meta(ge=1, le=256)] = 4
    max_requests: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_cost_usd: Annotated[float, msgspec.Meta(gt=0)] | None = None


class Strategy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Rollout steps for one deployment; without it the router's configured steps and interval apply.

    With `analysis`, a step advances only after its analysis succeeds (`count` times); a failing
    analysis aborts the canary, and too many inconclusive ones pause it for an operator. Steps are
    numbers (weights) or step kinds (`Step`). `blue_green` replaces the canary steps; `shadow`
    mirrors traffic to the candidate while the rollout is live (alone: a shadow-only rollout that
    serves no user from the candidate until an operator promotes it).
    """

    steps: Annotated[list[Percent | Step], msgspec.Meta(min_length=1, max_length=40)] | None = None
    interval_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] | None = None  # between steps / analysis looks
    analysis: AnalysisSpec | None = None
    blue_green: BlueGreen | None = None
    shadow: ShadowSpec | None = None

    def __post_init__(self) -> None:
        if self.blue_green is not None and self.steps:
            raise ValueError("blue_green replaces canary steps: give one or the other")
        if self.blue_green is not None and self.analysis is not None:
            raise ValueError("blue_green has its own pre_promotion_analysis and post_promotion_analysis")

    def weights(self) -> list[float]:
        """The weights of the steps (plain numbers and set_weight steps), in order."""
        return [s if isinstance(s, float | int) else s.set_weight for s in self.steps or ()
                if isinstance(s, float | int) or s.set_weight is not None]

    def kinds(self) -> bool:
        """True when the steps hold pauses or header routes (the step program runs them in order)."""
        return any(isinstance(s, Step) and s.set_weight is None for s in self.steps or ())

    def program(self) -> list[Step]:
        """The steps as `Step`s, in the order given."""
        return [Step(set_weight=float(s)) if isinstance(s, float | int) else s for s in self.steps or ()]

    def shadow_only(self) -> bool:
        """A shadow rollout without steps: the candidate is only mirrored to, never served."""
        return self.shadow is not None and not self.steps and self.blue_green is None


class AnalysisStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Where a rollout's analysis stands; kept in the route so every replica counts the same looks."""

    look: int = 0  # looks with enough data in this rollout (sets each look's confidence level)
    successes: int = 0  # successful measurements in the current step
    failures: int = 0
    inconclusives: int = 0
    consecutive_errors: int = 0  # looks in a row that raised; any measured look resets it
    last: Measurement | None = None
    at: float = 0.0
    # Unix seconds the current step began (0: when the rollout started): a `drift` metric's look counts only a
    # report produced since, so one report never passes two steps, or a step and the promotion.
    step_at: float = 0.0
    # Unix seconds of the first of the looks in a row that waited for evidence (0: the last look did not wait, or
    # the rollout was paused or resumed since): past the analysis's progress deadline they count as inconclusive.
    waiting_since: float = 0.0
    # What the route's reason ends with while its step waits (`progress.on_measurement`), taken off when the wait
    # ends, so the reason says what the step waits for and nothing stale.
    wait_note: str = ""
