"""The router's inference events, bounded so each one always fits one bus message.

The router records every request it serves with its prompt, its answer and its tool calls. A message on the bus
carries at most NATS' max_payload (1 MB by default), and an event over it fails its publish the same way every
time: before this bound the outbox logged it and dropped it, so a long-context call, an `n>1` answer or a large
tool call was never canary evidence, drift or score input, nor a cost ledger row (while the budgets were charged
for it). Here the free text is cut instead, after secrets were scrubbed (a secret cut in half would no longer be
recognised), on a character boundary, and the event says what was cut and how large it was
(`lockgate.truncated`). Usage, status, latency and the accounting attributes are never cut.

The scrub runs here, once, and the event says which secrets it masked in the answer (`lockgate.secrets_masked`,
"kind:count,..."): online `pii_free` reads the answer after the scrub, and without the counts a canary leaking
credentials scored as clean as stable (probe p63 E). They count the secrets of the kinds `pii_free` looks for
(`secretkinds`), found in the answer before the scrub, never every mask: the scrub also masks what a keyword names,
and an answer of placeholder code (`api_key="YOUR_API_KEY"`, `password="password"`) was scored a leak (probe p71 F3).
The answer is all of it: choice 0's text (`response`) and the output messages' other choices' texts and tool calls,
scrubbed as the event is built (`Tally`), whose counts join the response's; before, a key leaked in a tool call's
arguments was masked uncounted, and a canary e-mailing it scored as clean as stable (probe p71 residual).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import msgspec

from lockgate import secretkinds
from lockgate.contracts import InferenceEvent
from lockgate.contracts.inference import SECRETS_MASKED
from lockgate.encoded import Encoded
from lockgate.outbox import BATCH_BYTES, encode_event
from lockgate.redact import scrub_event, scrub_secrets
from lockgate.textbound import STRIPPED_BYTES, TEXT_BYTES, TRUNCATED, cut, marker
from lockgate.textbound import size as _size

# The encoded event's bound: well under BATCH_BYTES (what the outbox puts in one message, itself under the 1 MB
# max_payload with room for the message's headers), so a cut event also shares its message with others.
EVENT_BYTES = 512 * 1024
# The free text a client or an upstream chooses, and nothing else: the model (the ledger's price), the status and
# the names the router sets are never cut (user_hash and key_id have a bound of their own).
_TEXT = ("prompt", "response", "session_id", "error_type", "finish_reason", "response_model")
# Every string field, for the size of the usual event.
_STRINGS = (*_TEXT, "model", "provider", "operation", "status", "variant", "release", "deployment", "app", "tenant")
# An event whose strings add up to at most this many characters encodes within EVENT_BYTES whatever they are
# (JSON writes one character in at most 6 bytes, `\u001f`; 4 KiB is room for the numbers and field names), so
# the usual event is neither cut nor measured.
_SMALL = (EVENT_BYTES - 4096) // 6

assert EVENT_BYTES < BATCH_BYTES


def _chars(event: InferenceEvent) -> int:
    n = sum(len(s) for name in _STRINGS if (s := getattr(event, name)))
    n += sum(len(k) + len(v) for k, v in event.attributes.items())
    return n + sum(len(k) for k in event.scores)


def cut_event(event: InferenceEvent, limit: int, sizes: dict[str, int], *, drop_text: bool = False) -> InferenceEvent:
    """The event with each free-text field and attribute value cut to `limit` bytes (with `drop_text`, its prompt
    and response removed), marked with `lockgate.truncated`. `sizes` holds the sizes before any cut of the fields
    cut earlier (`name: bytes`, added to here), so a second cut still reports what the text was."""
    changed: dict[str, object] = {}
    for name in _TEXT:
        text = getattr(event, name)
        if not text:
            continue
        if drop_text and name in ("prompt", "response"):
            sizes.setdefault(name, _size(text))
            changed[name] = None
        elif (short := cut(text, limit)) is not text:
            sizes.setdefault(name, _size(text))
            changed[name] = short
    attributes = dict(event.attributes)
    attributes.pop(TRUNCATED, None)
    built = () if drop_text else tuple(sizes)  # cut as they were built (JSON kept whole): not cut again but to strip
    for key, value in event.attributes.items():
        if key != TRUNCATED and key not in built and (short := cut(value, limit)) is not value:
            sizes.setdefault(key, _size(value))
            attributes[key] = short
    if sizes:
        attributes[TRUNCATED] = marker(sizes)
        changed["attributes"] = attributes
    return msgspec.structs.replace(event, **changed) if changed else event


class Tally:
    """A scrub (`scrub_secrets`) that counts, by kind, the secrets `pii_free` looks for that the texts it masked held
    (`secretkinds`): the output messages' texts and tool calls, scrubbed as the event is built (wire.Choices)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def scrub(self, text: str) -> str:
        """`text` scrubbed, its secrets counted (looked for only when the scrub masked something: no second scan of
        the usual text, and a secret the scrub left in place is in the event for pii_free to find)."""
        clean = scrub_secrets(text)
        if clean != text:  # by value: the scrub may return an equal string that is another object
            self.counts.update(secretkinds.counted(text))
        return clean


def masked(event: InferenceEvent, more: Mapping[str, int] | None = None) -> InferenceEvent:
    """The event scrubbed (`scrub_event`), with SECRETS_MASKED counting, by kind, the secrets `pii_free` looks for
    (`secretkinds`) that its answer held before the scrub masked them (none: no such attribute): those of its
    `response` and `more` (a `Tally`'s of the rest of the answer, its output messages but choice 0's text, which is
    the response). The counts are this router's alone: a value the event held before is dropped."""
    scrubbed = scrub_event(event)
    raw, clean = event.response, scrubbed.response
    # Looked for only where the scrub masked something in the answer: the usual answer pays no second scan, and a
    # secret the scrub left in place is found by pii_free itself.
    counts = Counter(secretkinds.counted(raw)) if raw and clean is not raw else Counter()
    counts.update(more or {})
    counts = +counts  # a kind counted none is no count (`secretkinds.decode` refuses one)
    if not counts and SECRETS_MASKED not in scrubbed.attributes:
        return scrubbed  # the usual event: nothing masked in its answer, nothing to say
    attributes = {k: v for k, v in scrubbed.attributes.items() if k != SECRETS_MASKED}
    if counts:
        attributes[SECRETS_MASKED] = secretkinds.encode(counts)
    return msgspec.structs.replace(scrubbed, attributes=attributes)


def encode_served(event: InferenceEvent, sizes: dict[str, int] | None = None,
                  masked_more: Mapping[str, int] | None = None) -> Encoded:
    """The router's event scrubbed (`masked`: saying which secrets were masked in its answer, `masked_more` those
    masked in its output messages as they were built) and encoded (`encode_event`), its text cut to fit one bus
    message.

    `sizes`: the fields cut already as the event was built (the output messages, cut part by part so the JSON
    stays whole), with their sizes before the cut. An event still larger than EVENT_BYTES once each text is
    cut to TEXT_BYTES (JSON escapes, many attributes) loses its prompt and response and keeps STRIPPED_BYTES of
    every other text: what the evidence, the ledger and the budgets read is in its numbers and short attributes,
    and an event is never dropped for its size."""
    event = masked(event, masked_more)  # first: a cut must never leave half a secret the scrubber would have masked
    if not sizes and _chars(event) <= _SMALL:
        return encode_event(event, scrubbed=True)  # the usual event: one scrub, one encode
    sizes = dict(sizes or {})
    encoded = encode_event(cut_event(event, TEXT_BYTES, sizes), scrubbed=True)
    if len(encoded.data) > EVENT_BYTES:
        encoded = encode_event(cut_event(event, STRIPPED_BYTES, sizes, drop_text=True), scrubbed=True)
    return encoded
