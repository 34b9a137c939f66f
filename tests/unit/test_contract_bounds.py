"""The documents people publish on the events stream are bounded (probe p12: one 1 MB label was as valid as a
short one): over a bound, a document is refused where it is made (FieldTooLong, before it is published) and where it
is decoded (InvalidEvent: its consumers dead-letter it), naming the field."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest

from lockgate.codec import Codec, encode
from lockgate.contracts import ArtifactRegistered, EvalRequested, GateReview, ReleaseRegistered
from lockgate.contracts.bounds import LABEL_MAX, LABELS_MAX, TEXT_MAX
from lockgate.errors import FieldTooLong, InvalidEvent

HASH = "sha256:" + "0" * 64


def _artifact(**over: Any) -> dict[str, Any]:
    return {"kind": "dataset", "name": "qa", "hash": HASH, **over}


CASES = [
    (ArtifactRegistered, _artifact(labels={"pad": "x" * (LABEL_MAX + 1)}), "`$.labels['pad']`"),
    (ArtifactRegistered, _artifact(labels={f"k{i}": "v" for i in range(LABELS_MAX + 1)}), "`$.labels`"),
    (ArtifactRegistered, _artifact(labels={"k" * 200: "v"}), "a key of `$.labels`"),
    (ArtifactRegistered, _artifact(media_type="x" * (LABEL_MAX + 1)), "`$.media_type`"),
    (ArtifactRegistered, _artifact(hash="sha256:" + "0" * 1000), "`$.hash`"),
    (ArtifactRegistered, _artifact(source="x" * 257), "`$.source`"),
    (ReleaseRegistered, {"release": "r1", "app": "shop", "artifacts": {}, "description": "d" * (TEXT_MAX + 1)},
     "`$.description`"),
    (ReleaseRegistered, {"release": "r1", "app": "shop", "artifacts": {f"prompt/p{i}": HASH for i in range(257)}},
     "`$.artifacts`"),
    (EvalRequested, {"run_id": "run-1", "release": "r1", "suite": HASH, "endpoint": "prov", "model": "m" * 2000},
     "`$.model`"),
    (GateReview, {"release": "r1", "action": "approve", "actor": "ann", "reason": "r" * (TEXT_MAX + 1)},
     "`$.reason`"),
]


@pytest.mark.parametrize(("cls", "fields", "where"), CASES)
def test_a_document_over_its_bounds_is_refused_when_made_and_when_decoded(cls: type, fields: dict[str, Any],
                                                                         where: str) -> None:
    with pytest.raises(FieldTooLong, match=rf"{cls.__name__} is too large to publish: .* - at {re.escape(where)}$") as made:
        cls(**fields)
    assert made.value.exit_code == 2  # invalid input, in one line
    wire = encode({"type": cls.__struct_config__.tag, **fields})
    decoded = where.removeprefix("a key of ").replace("['pad']", "[...]")  # as msgspec words them
    with pytest.raises(InvalidEvent, match=re.escape(decoded)):
        Codec(cls).decode(wire)


@pytest.mark.parametrize(("cls", "fields", "where"), CASES)
def test_a_document_at_its_bounds_is_made_and_decoded(cls: type, fields: dict[str, Any], where: str) -> None:
    def trim(value: Any, limit: int) -> Any:
        if isinstance(value, str):
            return value[:limit]
        return dict(list(value.items())[:limit]) if isinstance(value, dict) else value

    limits = {"labels": LABELS_MAX, "artifacts": 256, "description": TEXT_MAX, "reason": TEXT_MAX, "source": 256,
              "media_type": LABEL_MAX, "model": LABEL_MAX, "hash": 128}
    fields = {k: trim(v, limits.get(k, 1 << 30)) for k, v in fields.items()}
    if "labels" in fields:
        fields["labels"] = {k[:128]: v[:LABEL_MAX] for k, v in fields["labels"].items()}
    made = cls(**fields)
    assert Codec(cls).decode(encode(made)) == made
    assert msgspec.structs.replace(made, id="again").id == "again"  # replace checks them again, and passes
