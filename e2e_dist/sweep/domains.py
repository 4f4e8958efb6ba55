"""Search-space domains of a sweep file: the values one run-config key takes.

`{grid: [..]}` crosses with the other grid dimensions; `{choice: [..]}`, `{uniform: [lo, hi]}`,
`{loguniform: [lo, hi]}`, `{randint: [lo, hi]}` are drawn per sample (search: random). Each maps to
its Ray Tune domain (`to_tune`) and lists the values every trial config must accept
(`check_values`), so a sweep is validated whole before Ray starts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import model_validator

from e2e_dist.config import Section


class Domain(Section):
    """Exactly one of the fields: the values one run-config key takes in the sweep."""

    grid: list[Any] | None = None
    """Every value, crossed with the other grid dimensions (Ray `grid_search`)."""
    choice: list[Any] | None = None
    """One value drawn uniformly per sample (search: random)."""
    uniform: tuple[float, float] | None = None
    """Float drawn uniformly from [lo, hi) (search: random)."""
    loguniform: tuple[float, float] | None = None
    """Float drawn log-uniformly from [lo, hi), 0 < lo (search: random)."""
    randint: tuple[int, int] | None = None
    """Integer drawn uniformly from [lo, hi) — hi excluded, as in Ray (search: random)."""

    @model_validator(mode="before")
    @classmethod
    def _is_mapping(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"expected a domain like {{grid: [..]}}, {{choice: [..]}}, {{uniform: [lo, hi]}}, "
                             f"{{loguniform: [lo, hi]}} or {{randint: [lo, hi]}}, got {data!r}")
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> "Domain":
        set_ = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"a domain needs exactly one of grid/choice/uniform/loguniform/randint, got {set_ or 'none'}")
        kind, value = set_[0], getattr(self, set_[0])
        if kind in ("grid", "choice") and not value:
            raise ValueError(f"empty {kind}")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind}: needs lo < hi, got {list(value)}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform: needs 0 < lo, got {list(value)}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)

    def to_tune(self) -> Any:
        """The Ray Tune domain (ray.tune.grid_search / choice / uniform / loguniform / randint)."""
        from ray import tune

        fn = {"grid": tune.grid_search, "choice": tune.choice}.get(self.kind)
        if fn is not None:
            return fn(list(getattr(self, self.kind)))
        lo, hi = getattr(self, self.kind)
        return getattr(tune, self.kind)(lo, hi)

    def check_values(self) -> list[Any]:
        """Values every run config must accept: all listed values, the ends of ranges, every
        integer of a short randint range (heads that must divide a width are typically a few)."""
        if self.kind in ("grid", "choice"):
            return list(getattr(self, self.kind))
        lo, hi = getattr(self, self.kind)
        if self.kind == "randint":
            return list(range(lo, hi)) if hi - lo <= 64 else [lo, hi - 1]
        return [lo, float(np.nextafter(hi, lo))]  # hi itself is never drawn
