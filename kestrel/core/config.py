"""The two pydantic bases every config and request model in Kestrel derives from.

* `StrictModel`: unknown fields are errors, so a misspelt option ("text_feild") is a 422 or a
  `ValidationError` rather than a silently ignored field. Parts of a larger model (a dataset
  source, a steering edit, an HTTP request) use it, so pydantic names the field's full path.
* `EngineConfig`: a `StrictModel` whose constructor raises the engine's `InvalidInputError`
  (one ``field: reason (got value)`` per problem), so a job given a bad config fails before it
  reads any data, with the same message the CLI and the API show.

Torch-free: the API process imports these to validate requests.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from kestrel.core.errors import InvalidInputError

__all__ = ["EngineConfig", "StrictModel", "invalid_config"]


class StrictModel(BaseModel):
    """Unknown fields are rejected, so a misspelt option is an error rather than silently ignored;
    so are NaN and ±Infinity (which Python's JSON reader accepts): no client input means them, and
    they would travel into histograms, learning rates and steering values as silent garbage."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def invalid_config(error: ValidationError, kind: str) -> InvalidInputError:
    """Turn pydantic's report into the engine's error, one `field: reason (got value)` per line."""
    problems: list[dict[str, str | None]] = []
    for item in error.errors(include_url=False):
        field = ".".join(str(part) for part in item["loc"]) or None
        reason = str(item["msg"]).removeprefix("Value error, ")
        if item.get("type") != "value_error" and "input" in item:
            reason += f" (got {item['input']!r})"
        problems.append({"field": field, "reason": reason})
    text = "; ".join(f"{p['field']}: {p['reason']}" if p["field"] else str(p["reason"]) for p in problems)
    return InvalidInputError(f"invalid {kind}: {text}", details={"errors": problems})


class EngineConfig(StrictModel):
    """Shared behaviour: unknown fields are errors and every failure is an `InvalidInputError`."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise invalid_config(error, type(self).__name__) from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """Parse a stored or requested config, with the same errors as the constructor."""
        if not isinstance(data, dict):
            raise InvalidInputError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
        return cls(**data)
