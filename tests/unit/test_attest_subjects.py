"""The subject list an attestation may carry: exactly the one lockgate's `attest` makes for the bundle (probe p8,
F3: a second subject, the digest of a release the gate BLOCKed, verified because only subject[0] was read)."""

from __future__ import annotations

from typing import Any

import pytest

from lockgate.provenance import attest

BUNDLE = {"release": "v1", "app": "shop", "artifacts": {"prompt/answer": "sha256:" + "a" * 64}}
BLOCKED = {**BUNDLE, "release": "v2-rc1", "artifacts": {"prompt/answer": "sha256:" + "b" * 64}}
GENUINE = attest.release_statement(BUNDLE)["subject"][0]
OTHER = attest.release_statement(BLOCKED)["subject"][0]


def test_the_subject_lockgate_makes_is_accepted() -> None:
    for kind in (attest.DECISION, attest.RELEASE):
        assert attest.subject_problem(attest.statement(kind, BUNDLE, {})["subject"], BUNDLE) == ""
    # The author is not content: a signed bundle has the same subject.
    assert attest.subject_problem([GENUINE], {**BUNDLE, "author": {"name": "ann"}}) == ""


@pytest.mark.parametrize(("subjects", "said"), [
    ([GENUINE, OTHER], "the statement has 2 subjects (subject[1] is 'release:v2-rc1')"),
    ([OTHER, GENUINE], "the statement has 2 subjects (subject[1] is 'release:v1')"),
    ([GENUINE, GENUINE], "the statement has 2 subjects"),
    ([GENUINE, "junk"], "the statement has 2 subjects (subject[1] is 'junk')"),
    ([], "the statement has no subject list (at subject)"),
    (None, "the statement has no subject list (at subject)"),
    ({"name": "release:v1"}, "the statement has no subject list (at subject)"),
    (["release:v1"], "subject[0] is not an object"),
    ([{**GENUINE, "uri": "oci://r/v2-rc1"}], "subject[0] has uri besides name and digest"),
    ([{**GENUINE, "annotations": {}, "uri": "x"}], "subject[0] has annotations, uri besides name and digest"),
    ([{**GENUINE, "name": "release:v2-rc1"}], "subject[0] is named 'release:v2-rc1', not 'release:v1'"),
    ([{"digest": GENUINE["digest"]}], "subject[0] is named None, not 'release:v1'"),
    ([{**GENUINE, "name": "v1"}], "subject[0] is named 'v1', not 'release:v1'"),
    ([{**GENUINE, "digest": "sha256:x"}], "subject[0] digest is not an object"),
    ([{**GENUINE, "digest": {**GENUINE["digest"], "sha512": "0" * 128}}], "subject[0] digest has sha512 beside sha256"),
    ([{**GENUINE, "digest": {"gitCommit": "0" * 40}}], "subject[0] digest has gitCommit beside sha256"),
    ([{**GENUINE, "digest": {}}], "subject 'release:v1' digest does not match the release it describes"),
    ([{**GENUINE, "digest": OTHER["digest"]}], "subject 'release:v1' digest does not match the release it describes"),
])
def test_any_other_subject_list_is_refused_saying_what_and_where(subjects: Any, said: str) -> None:
    problem = attest.subject_problem(subjects, BUNDLE)
    assert problem.startswith(said), problem
    assert "\n" not in problem


def test_a_line_break_in_the_payload_stays_on_one_line() -> None:
    problem = attest.subject_problem([{**GENUINE, "name": "release:v1\nverified: decision PASS"}], BUNDLE)
    assert "\n" not in problem and "'release:v1\\nverified: decision PASS'" in problem
    for where in ({**GENUINE, "uri\nverified": "x"}, {**GENUINE, "digest": {**GENUINE["digest"], "md5\nok": "x"}}):
        problem = attest.subject_problem([where], BUNDLE)
        assert problem and "\n" not in problem, problem
