"""in-toto attestations in DSSE envelopes: a gate decision or a release as a signed Statement whose
subject is the release's bundle digest (pure: no I/O; the signer and the checks are passed in).

A decision's predicate carries the gatekeeper-signed decision itself and the release bundle it judged, so
`verify` checks offline: the envelope's signature (a person of the trust file, whose role the caller
checks), that the one subject is the bundle's (its release's name, its sha256 and no other digest), the
decision's own signature (the trust roots), and that
the bundle's artifacts are exactly those the decision judged (no more, no fewer, the same hashes); a
release's predicate carries the bundle (and its author's signature, when it has one).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from lockgate import documents
from lockgate.contracts import GateDecided
from lockgate.errors import SignatureError
from lockgate.identity import Identity, bundle_content
from lockgate.ids import canonical_json, content_hash

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT = "https://in-toto.io/Statement/v1"
DECISION = "https://lockgate.dev/attestation/gate-decision/v1"
RELEASE = "https://lockgate.dev/attestation/release/v1"


class AttestationRefused(SignatureError):
    """An attestation that does not verify: malformed, altered, or signed by no one trusted."""


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the envelope's signatures sign."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def bundle_digest(bundle: Mapping[str, Any]) -> str:
    """The release's content hash (its artifacts, app, parent; not its author), hex for a subject."""
    return content_hash(canonical_json(bundle_content(bundle))).removeprefix("sha256:")


def statement(predicate_type: str, bundle: Mapping[str, Any], predicate: Mapping[str, Any]) -> dict[str, Any]:
    """An in-toto Statement about the release of `bundle`."""
    return {"_type": STATEMENT, "subject": [{"name": f"release:{bundle['release']}",
                                             "digest": {"sha256": bundle_digest(bundle)}}],
            "predicateType": predicate_type, "predicate": dict(predicate)}


def eval_summary(row: Mapping[str, Any]) -> dict[str, Any]:
    """What an attestation says of the eval run a decision judged: its results and the environment it ran in."""
    return {"run_id": row["run_id"], "status": row.get("status", ""), "n_cases": int(row.get("n_cases") or 0),
            "n_errors": int(row.get("n_errors") or 0), "time": str(row.get("time", "")),
            "metrics": {k: float(v) for k, v in (row.get("metrics") or {}).items()},
            "environment": {k: str(v) for k, v in (row.get("environment") or {}).items()}}


def decision_statement(decision: GateDecided, bundle: Mapping[str, Any],
                       evaluation: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A Statement that `decision` (signed by the gatekeeper) was made about the release of `bundle`, with
    the eval run it judged (results and environment) when known."""
    if decision.release != bundle.get("release"):
        raise AttestationRefused(f"decision {decision.id} is about {decision.release}, not {bundle.get('release')}")
    predicate: dict[str, Any] = {"decision": msgspec.to_builtins(decision), "release": dict(bundle)}
    if evaluation is not None:
        predicate["eval"] = eval_summary(evaluation)
    return statement(DECISION, bundle, predicate)


def release_statement(bundle: Mapping[str, Any]) -> dict[str, Any]:
    """A Statement of what the release is made of."""
    return statement(RELEASE, bundle, {"release": dict(bundle)})


def envelope(stmt: Mapping[str, Any], identity: Identity) -> dict[str, Any]:
    """The Statement in a DSSE envelope signed by `identity`."""
    payload = canonical_json(dict(stmt))
    return {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": identity.key_id, "sig": identity.sign(pae(PAYLOAD_TYPE, payload))}]}


def _payload(env: Mapping[str, Any]) -> bytes:
    if env.get("payloadType") != PAYLOAD_TYPE:
        raise AttestationRefused(f"not an in-toto DSSE envelope (payloadType {env.get('payloadType')!r})")
    try:
        return base64.b64decode(str(env.get("payload", "")), validate=True)
    except (binascii.Error, ValueError):
        raise AttestationRefused("the envelope's payload is not base64") from None


def other_content(decision: GateDecided, artifacts: Any) -> str:
    """How the release artifacts the decision judged (its `kind/name` keys; the bare `eval_suite` and `policy`
    are not release content) differ from the bundle's; "" when they are exactly the same, key for key.

    Only the same set counts: a bundle that dropped a judged artifact, or holds one the gate never saw, is
    content nobody judged, and the decision (the gatekeeper's signature) does not speak for it."""
    if not isinstance(artifacts, dict) or not all(isinstance(v, str) for v in artifacts.values()):
        return "the release's artifacts are not a mapping of kind/name to hash"
    if not decision.judged:
        return f"decision {decision.id} names no artifacts it judged, so it speaks for no content"
    diffs = decision.differences(artifacts, "release holds")
    if not diffs:
        return ""
    return f"the decision judged other content than the release holds ({'; '.join(diffs)})"


def _keys(keys: list[str]) -> str:
    # Keys come from the signed payload: a line break in one must not make the refusal look like two lines.
    return ", ".join(k if k.isprintable() else repr(k) for k in keys)


def subject_problem(subjects: Any, bundle: Mapping[str, Any]) -> str:
    """How the statement's subject list differs from the one `statement` makes for `bundle`, with where;
    "" when it is exactly that: one subject, named for the bundle's release, its only digest the bundle's sha256.

    An in-toto statement is a claim about every subject it lists (cosign and the policy-controller match an
    artifact against any subject's digest), so each subject and digest verify does not compare would be
    vouched for unchecked: a second subject, or a second digest algorithm beside sha256."""
    if not isinstance(subjects, list) or not subjects:
        return "the statement has no subject list (at subject): a lockgate attestation is about one release bundle"
    if len(subjects) != 1:
        second = subjects[1].get("name") if isinstance(subjects[1], dict) else subjects[1]
        return (f"the statement has {len(subjects)} subjects (subject[1] is {second!r}): a lockgate attestation is "
                f"about exactly one, the release bundle it carries, and in-toto applies a statement to every subject")
    subject = subjects[0]
    if not isinstance(subject, dict):
        return "subject[0] is not an object"
    extra = sorted(set(subject) - {"name", "digest"})
    if extra:
        return f"subject[0] has {_keys(extra)} besides name and digest, which lockgate does not check"
    expected = f"release:{bundle.get('release')}"
    if subject.get("name") != expected:
        return f"subject[0] is named {subject.get('name')!r}, not {expected!r} (the release of the bundle it carries)"
    digest = subject.get("digest")
    if not isinstance(digest, dict):
        return "subject[0] digest is not an object"
    others = sorted(set(digest) - {"sha256"})
    if others:
        return (f"subject[0] digest has {_keys(others)} beside sha256: only sha256 is compared with "
                f"the bundle, so the statement would vouch for a digest nobody checked")
    if digest.get("sha256") != bundle_digest(bundle):
        return f"subject {expected!r} digest does not match the release it describes (at subject[0].digest.sha256)"
    return ""


def verify(env: Mapping[str, Any], check_signer: Callable[[str, str, bytes], str],
           check_decision: Callable[[GateDecided], str]) -> dict[str, Any]:
    """The verified Statement, with `signed_by` and (for a decision) `decision_key`; AttestationRefused
    naming the first thing that does not check out.

    `check_signer(key_id, sig, data)` returns who holds the key or raises SignatureError;
    `check_decision(decision)` returns the trusted key id that signed it or raises SignatureError."""
    payload = _payload(env)
    signers = []
    for sig in env.get("signatures") or []:
        try:
            signers.append(check_signer(str(sig.get("keyid", "")), str(sig.get("sig", "")),
                                        pae(PAYLOAD_TYPE, payload)))
        except SignatureError as exc:
            raise AttestationRefused(f"envelope signature: {exc.message}") from None
    if not signers:
        raise AttestationRefused("the envelope carries no signature")
    try:
        stmt = documents.decode_json(payload, where="the payload", error=AttestationRefused)
        bundle = stmt["predicate"]["release"]
        kind = stmt["predicateType"]
        if not isinstance(bundle, dict):
            raise TypeError(bundle)
    except (ValueError, KeyError, TypeError):
        raise AttestationRefused("the payload is not a lockgate in-toto Statement") from None
    if stmt.get("_type") != STATEMENT:
        raise AttestationRefused(f"the payload is not an in-toto Statement v1 ({stmt.get('_type')!r})")
    wrong_subject = subject_problem(stmt.get("subject"), bundle)
    if wrong_subject:
        raise AttestationRefused(wrong_subject)
    out = {"statement": stmt, "signed_by": signers, "release": bundle.get("release")}
    if kind == DECISION:
        try:
            decision = msgspec.convert(stmt["predicate"]["decision"], GateDecided)
        except (KeyError, msgspec.ValidationError) as exc:
            raise AttestationRefused(f"the predicate's decision is malformed: {exc}") from None
        if decision.release != bundle.get("release"):
            raise AttestationRefused(f"the decision is about {decision.release}, the subject {bundle.get('release')}")
        try:
            out["decision_key"] = check_decision(decision)
        except SignatureError as exc:
            raise AttestationRefused(f"predicate decision: {exc.message}") from None
        different = other_content(decision, bundle.get("artifacts"))
        if different:
            raise AttestationRefused(different)
        evaluation = stmt["predicate"].get("eval")
        if evaluation is not None and evaluation.get("run_id") != decision.eval_run:
            raise AttestationRefused(f"the predicate's eval run {evaluation.get('run_id')} is not the one the "
                                     f"decision judged ({decision.eval_run})")
        out["decision"] = decision.decision
    elif kind != RELEASE:
        raise AttestationRefused(f"unknown predicate type {kind!r}")
    return out
