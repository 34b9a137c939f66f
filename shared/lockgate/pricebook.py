"""The versioned price book: one format, read by the cost accountant and the evaluator alike."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from lockgate.errors import ConfigError
from lockgate.ids import content_hash
from lockgate.modelnames import same_model
from lockgate.onereading import Expands, TwoReadings, yaml_loads

Rate = Annotated[float, msgspec.Meta(ge=0)]
SHIPPED = Path(__file__).with_name("pricebook.yaml")


class PriceBookError(ConfigError):
    """The price book is unreadable or malformed."""


class ModelPrice(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """USD per million tokens; cached input falls back to the input rate, as does a prompt-cache write (Anthropic
    bills one written for 5 minutes at 1.25x input, `cache_write_per_mtok`, and one written for an hour at 2x,
    `cache_write_1h_per_mtok`, which falls back to the 5-minute rate)."""

    input_per_mtok: Rate
    output_per_mtok: Rate
    cached_input_per_mtok: Rate | None = None
    cache_write_per_mtok: Rate | None = None
    cache_write_1h_per_mtok: Rate | None = None

    def cost(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0, cache_write_tokens: int = 0,
             cache_write_1h_tokens: int = 0) -> float:
        """USD for one call: cached tokens at the cached rate, cache writes (`cache_write_tokens`, of which
        `cache_write_1h_tokens` were written for an hour) at their write rates, the rest of the input at the input
        rate. Reads and writes are counted inside `input_tokens` (as OpenAI counts cached tokens in the prompt), so
        neither is charged beyond it."""
        cached = min(cached_tokens, input_tokens)
        written = min(cache_write_tokens, input_tokens - cached)
        hour = min(cache_write_1h_tokens, written)
        cached_rate = self.input_per_mtok if self.cached_input_per_mtok is None else self.cached_input_per_mtok
        write_rate = self.input_per_mtok if self.cache_write_per_mtok is None else self.cache_write_per_mtok
        hour_rate = write_rate if self.cache_write_1h_per_mtok is None else self.cache_write_1h_per_mtok
        return ((input_tokens - cached - written) * self.input_per_mtok + cached * cached_rate
                + (written - hour) * write_rate + hour * hour_rate + output_tokens * self.output_per_mtok) / 1e6

    @property
    def dearest_input_per_mtok(self) -> float:
        """The most one input token may be billed at: the input rate, or a prompt-cache write's where it is dearer
        (Anthropic's hour-long write, 2x input)."""
        rates = (self.input_per_mtok, self.cache_write_per_mtok, self.cache_write_1h_per_mtok)
        return max(rate for rate in rates if rate is not None)

    def writing(self) -> ModelPrice:
        """This price with every input token at `dearest_input_per_mtok`: a call's worst case where its upstream may
        write the whole prompt to the cache (no cached tokens go with it, so the cached rate needs no care)."""
        return msgspec.structs.replace(self, input_per_mtok=self.dearest_input_per_mtok)


class PriceBook(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A versioned price list; `hash` identifies exactly which prices a ledger row used."""

    version: str
    models: dict[str, ModelPrice]
    currency: Literal["USD"] = "USD"  # every cost lockgate reports is in USD; there is no conversion
    hash: str = ""


def priced_model(model: str, response_model: str, models: Mapping[str, Any]) -> str:
    """The model whose price a call's tokens are charged at (budgets and the ledger alike), "" when the book prices
    neither: the model that answered (`response_model`) when it is another model than the one asked for (`model`;
    modelnames.same_model: not a version of it) and the book prices it, as the provider bills that one; else the one
    asked for, else the one that answered. (Before, probe p50 F1, the one asked for: an aggregator that fell back
    to another model was charged at the release's model's price.)"""
    if response_model in models and not same_model(model, response_model):
        return response_model
    return model if model in models else (response_model if response_model in models else "")


def parse_price_book(data: Any) -> PriceBook:
    """Validate a parsed YAML/JSON mapping into a PriceBook stamped with its content hash."""
    models = data.get("models") if isinstance(data, dict) else None
    if isinstance(models, dict):
        # Model by model, so the error names the model ("models.gpt-4o ...") rather than `$.models[...]`.
        for name, rates in models.items():
            try:
                msgspec.convert(rates, ModelPrice, strict=False)
            except msgspec.ValidationError as exc:
                raise PriceBookError(f"price book is malformed: models.{name}: {exc}") from None
    try:
        book = msgspec.convert(data, PriceBook, strict=False)
    except msgspec.ValidationError as exc:
        raise PriceBookError(f"price book is malformed: {exc}") from None
    return msgspec.structs.replace(book, hash=content_hash(data))


def load_price_book(path: str = "") -> PriceBook:
    """Read and validate a YAML price book; an empty path means the one shipped with lockgate."""
    p = Path(path).expanduser() if path else SHIPPED
    try:
        data = yaml_loads(p.read_bytes())  # bytes: text that is not UTF-8 is a YAMLError too, naming its place
    except OSError as exc:
        raise PriceBookError(f"cannot read price book {p}: {exc.strerror or exc}") from None
    except (TwoReadings, Expands) as exc:  # a model's price given twice: the reviewer's and lockgate's would differ
        raise PriceBookError(f"price book {p} is refused: {exc}") from None
    except yaml.YAMLError as exc:  # on one line: YAML's message spans several (probe p58 F6)
        raise PriceBookError(f"price book {p} is not valid YAML: {' '.join(str(exc).split())}") from None
    return parse_price_book(data)
