"""The key store as a pod reads it from a Kubernetes Secret volume (deploy/k8s: `api_keys_file`): a change the admin
makes at home reaches it when the kubelet swaps the volume's `..data` symlink, even when the new file has the old one's
size and time; and a store with no key says why every key is refused (what readiness reports)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lockgate.config import Settings
from lockgate.server.apikeys import AuthError, KeyStore


def _publish(volume: Path, source: Path, version: str) -> None:
    """What the kubelet does with a Secret update: the files in a new directory, `..data` swapped to it by a rename
    of a symlink, the key's own path a symlink through `..data` made once."""
    (volume / version).mkdir()
    shutil.copy2(source, volume / version / "apikeys.json")
    (volume / "..data_tmp").symlink_to(version)
    os.replace(volume / "..data_tmp", volume / "..data")
    if not (volume / "apikeys.json").is_symlink():
        (volume / "apikeys.json").symlink_to("..data/apikeys.json")


def test_a_secret_volume_update_is_read_on_the_next_request_even_with_the_same_size_and_time(tmp_path: Path) -> None:
    admin, volume = KeyStore(tmp_path / "home"), tmp_path / "volume"
    volume.mkdir()
    plain, rec = admin.create("acme", "shop", deployments=["aaaa"])
    _publish(volume, admin.path, "..v1")
    pod = KeyStore.of(Settings(home=str(tmp_path / "pod"), api_keys_file=str(volume / "apikeys.json")))
    assert pod.authenticate(plain).deployments == ("aaaa",) and pod.problem() == ""

    before = (volume / "apikeys.json").stat()
    admin.rescope(rec.id, ["bbbb"])  # same length: the file's size does not change
    os.utime(admin.path, ns=(before.st_atime_ns, before.st_mtime_ns))  # nor its time (copy2 keeps it)
    _publish(volume, admin.path, "..v2")
    after = (volume / "apikeys.json").stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert pod.authenticate(plain).deployments == ("bbbb",)  # the inode differs: read again

    admin.revoke(rec.id)
    _publish(volume, admin.path, "..v3")
    with pytest.raises(AuthError):
        pod.authenticate(plain)


def test_a_file_replaced_by_a_rename_is_read_again(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    plain, rec = store.create("acme", "shop", deployments=["aaaa"])
    pod = KeyStore(tmp_path)
    assert pod.authenticate(plain).deployments == ("aaaa",)
    old = store.path.stat()
    copy = KeyStore(tmp_path / "elsewhere")
    copy.path.parent.mkdir()
    shutil.copy2(store.path, copy.path)
    copy.rescope(rec.id, ["bbbb"])
    os.utime(copy.path, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(copy.path, store.path)
    assert pod.authenticate(plain).deployments == ("bbbb",)


def test_a_store_without_a_key_says_why_every_key_is_refused(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    said = (f"no API keys in {store.path}: create one with `lockgate keys create`, or mount the key store there "
            "(LOCKGATE_API_KEYS_FILE names another file)")
    assert store.problem() == said  # no file
    store.path.write_text('{"keys": []}')
    assert store.problem() == said  # a file with none
    store.path.write_text("")
    assert store.problem().startswith(f"cannot read API keys from {store.path}")
    store.path.unlink()
    _, rec = store.create("acme", "shop")
    assert store.problem() == ""
    store.revoke(rec.id)
    assert store.problem() == ""  # a revoked key is a store someone keeps: refused as revoked, not as unmounted
