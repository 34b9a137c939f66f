"""Listing a KV bucket without a JetStream consumer.

nats-py lists keys (`keys()`) and follows them (`watch()`) through an ordered push consumer, and nats-server does
not check a push consumer's delivery subject against its creator's publish rights (nats-io/nats-server#8274):
whoever may create one on a bucket can have its stored values delivered onto any subject. Identities that only
read a bucket are therefore granted no consumer (permissions.py `_read_kv`): they list its keys from its stream's
subjects and read each with a message get (`kv.get`). Needs only nats-py, so the SDK uses it too.
"""

from __future__ import annotations

from typing import Any


async def kv_keys(js: Any, bucket: str, under: str = "") -> list[str]:
    """Every key of `bucket` with a stored message (a deleted or purged key keeps its marker, and its get says so);
    with `under` (ending in "."), those whose first tokens are it.

    One STREAM.INFO with a subjects filter; the server lists up to 100,000 subjects, and lockgate's buckets hold a
    few hundred keys. Raises what nats-py raises (NotFoundError for a missing bucket)."""
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}{under}>")
    return sorted(subject[len(prefix):] for subject in info.state.subjects or {})
