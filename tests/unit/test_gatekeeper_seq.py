"""The order the gatekeeper signs into a decision (`seq`, Stored.next_seq): the signing clock in microseconds, or one
above the decision it is stored over and every revision its key had if that is higher, so a release's decisions keep
rising whoever made the one before, and one made over a gates bucket made anew is above those made before it."""

from __future__ import annotations

import time

import pytest

from lockgate.contracts import GateDecided
from lockgate.services.gatekeeper.records import Stored

_AHEAD = 10**17  # a seq above the clock (signed by a gatekeeper whose clock ran ahead, in 5138)


def _decided(seq: int = 0) -> GateDecided:
    return GateDecided(release="a", decision="PASS", rules=[], seq=seq)


def _clock_us() -> int:
    return time.time_ns() // 1000


@pytest.mark.parametrize(("stored", "floor"), [
    (Stored(None, 0), 0),  # the release's first decision, or its first in a gates bucket made anew
    (Stored(_decided(seq=12), 12), 12),  # over a gatekeeper of before's (a small seq)
    (Stored(_decided(), 40), 40),  # over one signed before decisions carried a seq
    (Stored(None, 57, "is about 'b'"), 57),  # over a value that is no decision of the release
    (Stored(None, 0, deleted=90), 90),  # over a deleted key
    (Stored(_decided(seq=_AHEAD), 70), _AHEAD),  # over one signed by a clock ahead of this one: counted on from it
    (Stored(None, _AHEAD), _AHEAD),  # over a revision above the clock
])
def test_a_decision_is_ordered_by_the_clock_and_above_what_it_is_stored_over(stored: Stored, floor: int) -> None:
    before = _clock_us()
    seq = stored.next_seq
    after = _clock_us()
    assert max(floor + 1, before) <= seq <= max(floor + 1, after)


def test_a_decision_over_an_empty_key_is_above_what_a_gatekeeper_of_before_signed() -> None:
    # Found by a probe (p39 F2): over a gates bucket made anew it signed 1, below the PASS a client had read, and the
    # SDK refused the BLOCK. A seq of before is at most its bucket's count of writes, far below the clock's
    # microseconds (a trillion writes is 2**40).
    assert Stored(None, 0).next_seq > 2**40
