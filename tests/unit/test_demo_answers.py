"""The simulator `lockgate dev up` starts answers the repository's example GitOps folder right."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lockgate_dev.demo import demo_sim_config

FOLDER = Path(__file__).parents[1] / "fixtures" / "gitops"


def test_the_dev_simulator_answers_every_case_of_the_example_gitops_suite() -> None:
    # README's GitOps section gates the folder's releases on this simulator (their model is sim-stable). Before, it
    # answered 5 of the suite's 20 cases and the example release was BLOCKed (exact_match 0.25, needs 0.8).
    template = yaml.safe_load((FOLDER / "suites" / "qa.yaml").read_text())["spec"]["prompt"]["template"]
    cases = [json.loads(line) for line in (FOLDER / "datasets" / "qa.jsonl").read_text().splitlines() if line]
    expected = {template.format(**c["vars"]): str(c["expected"]) for c in cases}
    models = demo_sim_config().models
    for name in ("sim-stable", "sim-good"):  # the good candidate answers as stable does (no drift between them)
        assert {q: models[name].answers.get(q) for q in expected} == expected, name
