"""Cost per case from token usage, priced with lockgate's shared price book format."""

from __future__ import annotations

from typing import Any

from lockgate.pricebook import ModelPrice, PriceBookError, load_price_book, parse_price_book

__all__ = ["ModelPrice", "PriceBookError", "load_file", "parse"]


def parse(doc: Any, where: str) -> dict[str, ModelPrice]:
    """Model name -> price from a parsed price book artifact; errors name the artifact."""
    try:
        return parse_price_book(doc).models
    except PriceBookError as exc:
        raise PriceBookError(f"price book {where}: {exc.message}") from None


def load_file(path: str = "") -> dict[str, ModelPrice]:
    """The price book at `path` (Settings.price_book), or the one shipped with lockgate."""
    return load_price_book(path).models
