"""compose.yaml and deploy/k8s validated offline by standard validators, as a CI would run them:
check-jsonschema with the Compose Specification's schema it ships (vendor.compose-spec), and
kubernetes-validate with the Kubernetes OpenAPI schemas it ships, strict (an unknown field is an
error). Both come from the lock (dev group), nothing is fetched; a broken copy of each fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"
# The oldest Kubernetes the manifests promise to fit (policy/v1 PDBs, probes as written) and the newest
# the validator knows: a field that appeared or went away in between shows up in one of them.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
K8S_FILES = sorted((ROOT / "deploy/k8s").glob("*.yaml"))


def compose_schema_errors(path: Path) -> str:
    """check-jsonschema's report on a compose file ('' when it conforms to the Compose Specification)."""
    run = subprocess.run([str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", "-o", "text", str(path)],
                         capture_output=True, text=True, timeout=60)
    return "" if run.returncode == 0 else run.stdout + run.stderr


def k8s_schema_errors(text: str, version: str) -> list[str]:
    """Every resource of a manifest that the Kubernetes schemas of `version` refuse, strictly."""
    errors = []
    for doc in (d for d in yaml.safe_load_all(text) if d):
        where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where} at {'.'.join(map(str, exc.path))}: {exc.message}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
            errors.append(f"{where}: {exc}")
    return errors


def test_compose_file_conforms_to_the_compose_specification() -> None:
    assert compose_schema_errors(ROOT / "compose.yaml") == ""


@pytest.mark.parametrize(("old", "new", "expected"), [
    # a wrong type: published ports are a list
    ('ports: ["8080:8080"]', "ports: 8080", "8080 is not of type 'array'"),
    # an unknown field in a service
    ('command: ["serve", "drift"]', 'comand: ["serve", "drift"]', "'comand' was unexpected"),
    # a healthcheck's interval is a duration string
    ("interval: 5s", "interval: [5s]", "is not of type 'string'"),
])
def test_a_broken_compose_file_fails_the_schema(tmp_path: Path, old: str, new: str, expected: str) -> None:
    text = (ROOT / "compose.yaml").read_text()
    assert old in text
    broken = tmp_path / "compose.yaml"
    broken.write_text(text.replace(old, new, 1))
    assert expected in compose_schema_errors(broken)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_k8s_manifests_conform_to_the_kubernetes_schemas(path: Path, version: str) -> None:
    assert k8s_schema_errors(path.read_text(), version) == []


@pytest.mark.parametrize(("old", "new", "expected"), [
    # a wrong type: replicas is an integer
    ("replicas: 3", "replicas: three", "'three' is not of type 'integer'"),
    # an unknown field in a container (strict): a typo that a lenient check would drop silently
    ("readinessProbe: {httpGet", "readinesProbe: {httpGet", "'readinesProbe' was unexpected"),
    # an unknown field in a PodDisruptionBudget
    ("minAvailable: 1", "minAvailible: 1", "'minAvailible' was unexpected"),
    # a port is an integer or a name, never a list
    ("ports: [{port: 8080, targetPort: 8080}]", "ports: [{port: [8080], targetPort: 8080}]",
     "is not of type 'integer'"),
])
def test_a_broken_k8s_manifest_fails_the_schema(old: str, new: str, expected: str) -> None:
    text = (ROOT / "deploy/k8s/lockgate.yaml").read_text()
    assert old in text
    errors = k8s_schema_errors(text.replace(old, new, 1), K8S_VERSIONS[-1])
    assert any(expected in e for e in errors), errors


def test_the_schemas_are_the_packaged_ones() -> None:
    """The validators read the schemas their packages ship (pinned by uv.lock), none kept in the repository."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert not [f for f in tracked.splitlines() if "compose-spec" in f or "kubernetes-json-schema" in f]
    assert (CHECK_JSONSCHEMA.exists() and Path(kubernetes_validate.__file__).parent.joinpath(
        "kubernetes-json-schema", f"v{K8S_VERSIONS[-1]}-local-strict").is_dir())
