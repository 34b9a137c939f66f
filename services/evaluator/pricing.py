"""Cost per case from token usage and a price book in the cost service's YAML format.

The evaluator reads the same format with its own loader: services never import each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lockgate.errors import ConfigError

# The price book shipped with lockgate (a data file, read not imported).
SHIPPED = Path(__file__).resolve().parents[1] / "cost" / "pricebook.yaml"


class PriceBookInvalid(ConfigError):
    """A price book is unreadable or malformed."""


@dataclass(frozen=True)
class Price:
    """USD per million input and output tokens for one model."""

    input_per_mtok: float
    output_per_mtok: float

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """USD for one call."""
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


def parse(doc: Any, where: str) -> dict[str, Price]:
    """Model name -> Price from a parsed price book (`models: {name: {input_per_mtok, output_per_mtok}}`)."""
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, dict):
        raise PriceBookInvalid(f"price book {where}: expected a mapping with 'models'")
    if (doc.get("currency") or "USD") != "USD":
        raise PriceBookInvalid(f"price book {where}: currency must be USD")
    out = {}
    for name, rates in models.items():
        try:
            inp, outp = float(rates["input_per_mtok"]), float(rates["output_per_mtok"])
        except (KeyError, TypeError, ValueError):
            raise PriceBookInvalid(f"price book {where}: models.{name} needs numeric input_per_mtok and "
                                   "output_per_mtok") from None
        if inp < 0 or outp < 0:
            raise PriceBookInvalid(f"price book {where}: models.{name} has a negative rate")
        out[str(name)] = Price(inp, outp)
    return out


def load_file(path: str = "") -> dict[str, Price]:
    """The price book at `path` (Settings.price_book), or the shipped one; {} when neither exists."""
    p = Path(path).expanduser() if path else SHIPPED
    if not path and not p.is_file():
        return {}
    try:
        doc = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PriceBookInvalid(f"cannot read price book {p}: {exc}") from None
    return parse(doc, str(p))
