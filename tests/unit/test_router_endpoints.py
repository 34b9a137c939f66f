"""The endpoints file: providers, their credential headers, operation URLs and the model map."""

from __future__ import annotations

from pathlib import Path

import pytest

from lockgate.config import Settings
from lockgate.errors import ConfigError
from lockgate.services.router.endpoints import Endpoints

pytestmark = pytest.mark.timeout(30)


def _load(tmp_path: Path, text: str) -> Endpoints:
    (tmp_path / "endpoints.yaml").write_text(text)
    (tmp_path / "secrets.yaml").write_text("OAI: sk-o\nANT: sk-a\n")
    return Endpoints(Settings(home=str(tmp_path), endpoints_file=str(tmp_path / "endpoints.yaml"),
                              secrets_file=str(tmp_path / "secrets.yaml")))


def test_providers_credentials_and_model_map(tmp_path: Path) -> None:
    eps = _load(tmp_path, "endpoints:\n  o: {url: 'http://o.test/v1/', credential: OAI}\n"
                          "  a: {url: 'http://a.test/v1', credential: ANT, provider: anthropic}\n"
                          "models:\n  claude-x: support\n")
    o, a = eps.get("o"), eps.get("a")
    assert (o.provider, o.auth_headers, str(o.url)) == ("openai", {"Authorization": "Bearer sk-o"},
                                                         "http://o.test/v1/chat/completions")
    assert str(o.url_for("/embeddings")) == "http://o.test/v1/embeddings"
    assert (a.provider, a.auth_headers, str(a.url_for("/messages"))) == (
        "anthropic", {"x-api-key": "sk-a"}, "http://a.test/v1/messages")
    assert eps.models == {"claude-x": "support"}
    assert "sk-" not in repr(a)


def test_unknown_provider_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="provider"):
        _load(tmp_path, "endpoints:\n  g: {url: 'http://g.test/v1', provider: gemini}\n")
