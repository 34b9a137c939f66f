"""The streams that record who did what stay, whoever asks: on a real nats-server with the users of `lockgate
nats-config`, the admin identity (which may publish on any subject) is refused deleting or purging the provenance
stream, the releases bucket and the audit chain's head, and changing any of their configurations.

Before (probe p29 F8), `$JS.API.STREAM.DELETE.LG_PROVENANCE` from the admin credential answered success: every
alias's signed history and every artifact's lifecycle were gone (`history --at` said the alias pointed to nothing,
with no error; a sunset no longer blocked), and the topology made the stream anew, empty, a new chain starting at #1.
Message deletes and purges were refused by the stream's own settings, the stream's deletion by nothing. And (probe
p32) admin's update of the two buckets was answered: `max_age` of a second emptied them, as deleting would (`audit
verify` then failed, exit 4), and lifting the releases bucket's write-once rule let a binding be overwritten."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import nats.errors
import pytest
from nats.js.api import DiscardPolicy

from lockgate import artifacts
from lockgate.bus import Bus, config_differences, topology
from lockgate.provenance import aliases, lifecycle
from lockgate.subjects import token
from tests.helpers import person
from tests.integration.test_nats_auth import secured  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(90)

SECOND = {"max_age": 1.0, "duplicate_window": 1.0}  # probe p32's update: every message a second old goes


async def test_admin_cannot_delete_purge_or_shrink_the_records(secured) -> None:  # noqa: F811
    _, settings, admin = secured
    s = admin.subjects
    ann = person(settings, "ann", "operator")
    prompt = await artifacts.register(admin, "prompt", "shop-prompt", {"template": "v1"})
    await artifacts.register_release(admin, "shop-v1", "shop", {"prompt/shop-prompt": prompt.hash})
    await aliases.set_alias(admin, settings, ann, "shop", "production", "shop-v1", reason="launch")
    sunset = datetime.now(UTC) + timedelta(days=30)
    await lifecycle.deprecate(admin, settings, ann, prompt.hash, sunset=sunset, reason="old")
    await (await admin.kv(s.kv_audit)).put("probe", b"kept")  # a value in the chain head's bucket
    provenance = s.streams["provenance"].name
    stored = (await admin.js.stream_info(provenance)).state.messages
    assert stored == 2

    js = admin.nc.jetstream(timeout=1)  # a refused request is answered by no one: fail fast
    for stream in (provenance, f"KV_{s.kv_releases}", f"KV_{s.kv_audit}"):
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            await js.delete_stream(stream)
        assert admin.refused(f"$JS.API.STREAM.DELETE.{stream}") is not None, stream
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            await js.purge_stream(stream)
        assert admin.refused(f"$JS.API.STREAM.PURGE.{stream}") is not None, stream
    # Nor changing its configuration: nats-server refuses only lifting deny_delete and deny_purge, and one message at
    # most with discard old dropped every record but the last (tried before this fix).
    shrunk = (await admin.js.stream_info(provenance)).config.evolve(max_msgs=1, discard=DiscardPolicy.OLD)
    with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
        await js.update_stream(shrunk)
    assert admin.refused(f"$JS.API.STREAM.UPDATE.{provenance}") is not None

    # Nor the buckets': a second's max_age emptied them (probe p32), and the releases bucket's write-once rule lifted
    # let a binding be overwritten.
    releases, audit = f"KV_{s.kv_releases}", f"KV_{s.kv_audit}"
    binding = (await (await admin.kv(s.kv_releases)).get(token("shop-v1"))).value
    for stream, change in ((releases, SECOND), (audit, SECOND),
                           (releases, {"max_msgs_per_subject": 10, "discard_new_per_subject": False,
                                       "deny_delete": False, "deny_purge": False, "allow_rollup_hdrs": True})):
        admin.denied.clear()
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            await js.update_stream((await admin.js.stream_info(stream)).config.evolve(**change))
        assert admin.refused(f"$JS.API.STREAM.UPDATE.{stream}") is not None, (stream, change)
        assert await _differences(admin, stream) == [], stream  # its configuration is lockgate's still
    with pytest.raises(nats.errors.Error):  # still write-once
        await (await admin.kv(s.kv_releases)).put(token("shop-v1"), b'{"release": "other"}')
    assert (await (await admin.kv(s.kv_releases)).get(token("shop-v1"))).value == binding

    # Every record is where it was: the alias's history, the lifecycle (a sunset still dated), the binding, the head.
    assert (await admin.js.stream_info(provenance)).state.messages == stored
    current, upto, signers, skipped = await aliases.pointed_at(admin, settings, "shop", "production")
    assert current is not None and current.release == "shop-v1" and current.seq == 1
    assert signers == ["ann"] and skipped == [] and len(upto) == 1
    found = await lifecycle.history(admin, settings, prompt.hash)
    assert [r.sunset for r in found.records] == [sunset]
    assert (await artifacts.release_of(admin, "shop-v1"))["artifacts"] == {"prompt/shop-prompt": prompt.hash}
    assert (await (await admin.kv(s.kv_audit)).get("probe")).value == b"kept"


async def _differences(admin: Bus, stream: str) -> list[str]:
    declared = next(cfg for cfg, _ in topology(admin.subjects, 1) if cfg.name == stream)
    return config_differences(declared, (await admin.js.stream_info(stream)).config)
