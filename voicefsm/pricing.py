"""An *estimated* cost of a session's token usage, from per-token prices the operator configures.

voicefsm does not know what Google charges you: prices change, differ by tier, region, contract
and model, and the bill is the only truth. What it knows is the token counts the Live API
reported (``usageMetadata``) for each session. :class:`TokenPrices` turns them into an estimate
with prices *you* give (``--prices FILE.json``, ``VOICEFSM_PRICES``, or in code);
:data:`DEFAULT_PRICES` is only a starting point, and every estimate carries the date and source
of the prices it used so nobody mistakes it for an invoice.

Token counts are keyed by direction (``"input"``: the prompt, ``"output"``: the response) and
modality (``"text"``, ``"audio"``, ``"image"``, ``"video"``, ``"thoughts"`` for thinking tokens,
priced as text output, or ``"unspecified"`` when the server gave a total without a per-modality
breakdown).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from voicefsm.model import SessionUsage

Direction = Literal["input", "output"]
"""Which side of the model a token count is on: the prompt (``input``) or the response."""

PRICES_ENV = "VOICEFSM_PRICES"
"""Environment variable naming a JSON file of :class:`TokenPrices` (used when no file is given)."""


class TokenPrices(BaseModel):
    """Prices per million tokens, by direction and modality, with where they came from.

    ``unspecified_as`` says which modality's price applies to tokens the server reported without
    a modality breakdown (default ``"audio"``: in a voice interview most of the prompt is audio,
    and the audio price is the higher one, so the estimate errs high rather than low).
    Image and video input are priced like audio unless given: Google lists "audio/video" as one
    input price for the native-audio Live models.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    currency: str = Field("USD", min_length=1, description="Currency of every price below.")
    input_text_per_million: float = Field(ge=0, description="Prompt text tokens.")
    input_audio_per_million: float = Field(ge=0, description="Prompt audio tokens.")
    input_image_per_million: float | None = Field(
        None, ge=0, description="Prompt image tokens (default: the audio price)."
    )
    input_video_per_million: float | None = Field(
        None, ge=0, description="Prompt video tokens (default: the audio price)."
    )
    output_text_per_million: float = Field(ge=0, description="Response text tokens.")
    output_audio_per_million: float = Field(ge=0, description="Response audio tokens.")
    unspecified_as: Literal["text", "audio"] = Field(
        "audio", description="Price tokens without a modality breakdown as this modality."
    )
    as_of: str = Field(min_length=1, description="When these prices were read (ISO date).")
    source: str = Field(min_length=1, description="Where they were read (a URL, a contract).")

    def per_million(self, direction: Direction, modality: str) -> float:
        """The price of a million ``direction`` tokens of ``modality``."""
        if modality == "unspecified":
            modality = self.unspecified_as
        if direction == "input":
            if modality == "text":
                return self.input_text_per_million
            if modality == "image" and self.input_image_per_million is not None:
                return self.input_image_per_million
            if modality == "video" and self.input_video_per_million is not None:
                return self.input_video_per_million
            return self.input_audio_per_million
        if modality in ("text", "thoughts"):
            return self.output_text_per_million
        return self.output_audio_per_million


DEFAULT_PRICES = TokenPrices(
    currency="USD",
    input_text_per_million=0.50,
    input_audio_per_million=3.00,
    output_text_per_million=2.00,
    output_audio_per_million=12.00,
    as_of="2026-05-16",
    source=(
        "Gemini API paid tier, Gemini 2.5 Flash Native Audio (Live API), "
        "https://ai.google.dev/gemini-api/docs/pricing as quoted on 2026-05-16; "
        "check the page and your contract before relying on it"
    ),
)
"""A starting point, not the truth: Gemini 2.5 Flash Native Audio on the Live API, paid tier, as
listed on Google's pricing page around 2026-05-16 (text in $0.50, audio/video in $3.00, text out
$2.00, audio out $12.00 per million tokens). Configure your own prices for real estimates."""


@dataclass(frozen=True, slots=True)
class CostLine:
    """One priced row of an estimate: ``tokens`` of one direction and modality."""

    direction: Direction
    modality: str
    tokens: int
    per_million: float

    @property
    def cost(self) -> float:
        """``tokens`` at ``per_million``."""
        return self.tokens * self.per_million / 1_000_000


@dataclass(frozen=True, slots=True)
class CostEstimate:
    """An estimated cost, the rows it is made of and the prices' provenance (never an invoice)."""

    lines: tuple[CostLine, ...]
    currency: str
    as_of: str
    source: str

    @property
    def total(self) -> float:
        """The sum of every row."""
        return sum(line.cost for line in self.lines)

    def describe(self) -> str:
        """One line for a terminal: ``~$0.1234 (estimate; prices as of ...)``."""
        return f"~{format_money(self.total, self.currency)} (estimate; prices as of {self.as_of})"


def format_money(amount: float, currency: str) -> str:
    """``$0.1234`` for USD, ``0.1234 EUR`` otherwise; four decimals (sessions cost cents)."""
    if currency == "USD":
        return f"${amount:.4f}"
    return f"{amount:.4f} {currency}"


def estimate_cost(
    tokens: Mapping[tuple[Direction, str], int], prices: TokenPrices = DEFAULT_PRICES
) -> CostEstimate:
    """Price ``tokens`` (keyed by direction and modality) with ``prices``.

    Rows come out inputs first, then outputs, each by modality name; zero counts are left out.
    """
    for (direction, modality), count in tokens.items():
        if direction not in ("input", "output"):
            raise ValueError(f"token direction must be 'input' or 'output', not {direction!r}")
        if count < 0:
            raise ValueError(f"negative token count {count} for {direction} {modality}")
    order = {"input": 0, "output": 1}
    lines = tuple(
        CostLine(direction, modality, count, prices.per_million(direction, modality))
        for (direction, modality), count in sorted(
            tokens.items(), key=lambda item: (order[item[0][0]], item[0][1])
        )
        if count
    )
    return CostEstimate(lines, prices.currency, prices.as_of, prices.source)


def usage_tokens(usage: SessionUsage) -> dict[tuple[Direction, str], int]:
    """A session's summed tokens keyed by direction and (lower-case) modality, for pricing.

    Prompt or response tokens the server reported without a modality breakdown count as
    ``"unspecified"``; thinking tokens as output ``"thoughts"``. Tokens in the total that the
    prompt, response and thinking counts do not account for count as output ``"unspecified"``
    (a server that reports only prompt and total sizes still gets its response priced).
    """
    tokens: dict[tuple[Direction, str], int] = {}

    def add(direction: Direction, modality: str, count: int) -> None:
        if count > 0:
            tokens[(direction, modality)] = tokens.get((direction, modality), 0) + count

    sides: tuple[tuple[Direction, int, Mapping[str, int]], ...] = (
        ("input", usage.prompt_tokens, usage.prompt_tokens_by_modality),
        ("output", usage.response_tokens, usage.response_tokens_by_modality),
    )
    for direction, total, by_modality in sides:
        for modality, count in by_modality.items():
            add(direction, modality.lower().removeprefix("modality_") or "unspecified", count)
        add(direction, "unspecified", total - sum(by_modality.values()))
    add("output", "thoughts", usage.thoughts_tokens)
    counted = usage.prompt_tokens + usage.response_tokens + usage.thoughts_tokens
    add("output", "unspecified", usage.total_tokens - counted)
    return tokens


def load_prices(path: str | os.PathLike[str] | None = None) -> TokenPrices:
    """Prices from a JSON file (``path``, else ``$VOICEFSM_PRICES``), else :data:`DEFAULT_PRICES`.

    The file holds the fields of :class:`TokenPrices`; a missing or invalid file is an error
    naming the file, not a silent fallback to the defaults.
    """
    chosen = path if path is not None else os.environ.get(PRICES_ENV) or None
    if chosen is None:
        return DEFAULT_PRICES
    file = Path(chosen)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read prices from {file}: {error.strerror or error}") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"prices file {file} is not JSON: {error}") from error
    try:
        return TokenPrices.model_validate(data)
    except ValidationError as error:
        raise ValueError(f"prices file {file} is not valid: {error}") from error


__all__ = [
    "DEFAULT_PRICES",
    "PRICES_ENV",
    "CostEstimate",
    "CostLine",
    "Direction",
    "TokenPrices",
    "estimate_cost",
    "format_money",
    "load_prices",
    "usage_tokens",
]
