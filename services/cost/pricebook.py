"""Load the price book named in settings, or the one shipped beside this module."""

from __future__ import annotations

from pathlib import Path

import yaml

from services.cost.domain import PriceBook, PriceBookError, parse_price_book

DEFAULT_PATH = Path(__file__).with_name("pricebook.yaml")


def load_price_book(path: str = "") -> PriceBook:
    """Read and validate a YAML price book; an empty path means the shipped default."""
    p = Path(path).expanduser() if path else DEFAULT_PATH
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise PriceBookError(f"cannot read price book {p}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise PriceBookError(f"price book {p} is not valid YAML: {exc}") from None
    return parse_price_book(data)
