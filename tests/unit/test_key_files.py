"""The key files `lockgate up` writes hold the key alone (what `Authorization: Bearer $(cat FILE)` sends), and a
home made before, whose files hold `<id> <key>`, keeps its keys: read as before, rewritten to the key alone. A first
key an operator revoked stays revoked: `up` does not make it again."""

from __future__ import annotations

from pathlib import Path

from lockgate.server.apikeys import KeyStore, bootstrap, read_credential


def test_a_new_home_gets_files_holding_the_key_alone(tmp_path: Path) -> None:
    keys = bootstrap(tmp_path, app="shop")
    for file, key, role in ((keys.admin_file, keys.admin_key, "admin"), (keys.app_file, keys.app_key, "app")):
        assert Path(file).read_text() == f"{key}\n" and key.startswith("lg-")
        assert Path(file).stat().st_mode & 0o777 == 0o600
        assert read_credential(file) == key and KeyStore(tmp_path).authenticate(key).role == role
    assert bootstrap(tmp_path, app="shop") == keys  # made once: the next `up` keeps them


def test_a_home_made_before_keeps_its_keys_and_its_files_become_the_key_alone(tmp_path: Path) -> None:
    keys = bootstrap(tmp_path)
    store = KeyStore(tmp_path)
    for file, key in ((keys.admin_file, keys.admin_key), (keys.app_file, keys.app_key)):
        Path(file).write_text(f"{store.authenticate(key).id} {key}\n")  # the `<id> <key>` form of earlier homes
        assert read_credential(file) == key
    again = bootstrap(tmp_path)
    assert (again.admin_key, again.app_key) == (keys.admin_key, keys.app_key)
    assert Path(again.app_file).read_text() == f"{keys.app_key}\n"
    assert len(store.keys()) == 2  # no key made anew


def test_an_unknown_key_in_a_file_or_a_lost_file_of_a_live_key_is_made_again(tmp_path: Path) -> None:
    keys = bootstrap(tmp_path)
    store = KeyStore(tmp_path)
    Path(keys.admin_file).write_text("lg-not-a-key-of-this-home\n")
    Path(keys.app_file).unlink()
    again = bootstrap(tmp_path)
    assert again.app_key != keys.app_key and again.admin_key != keys.admin_key and again.withheld == ()
    assert store.authenticate(again.app_key).role == "app" and store.authenticate(again.admin_key).role == "admin"


def test_a_revoked_first_key_is_never_made_again(tmp_path: Path) -> None:
    # Before (probe p77 F1), the next `up` replaced a revoked first key: a new admin key, with no audit row.
    keys = bootstrap(tmp_path)
    store = KeyStore(tmp_path)
    admin, app = (store.authenticate(k).id for k in (keys.admin_key, keys.app_key))
    store.revoke(admin)
    store.revoke(app)
    Path(keys.app_file).unlink()  # revoked, then its file removed: still revoked
    again = bootstrap(tmp_path)
    assert (again.admin_key, again.app_key) == ("", "") and len(store.keys()) == 2
    assert [line.split(" was revoked")[0] for line in again.withheld] == [
        f"the first admin key `up` made ({admin}, in {keys.admin_file})",
        f"the demo app key `up` made ({app}, in {keys.app_file})"]
