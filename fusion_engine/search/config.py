"""The search's options (:class:`SearchConfig`) and their validation into a ConfigError."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from fusion_engine.core.config import validated


class SearchConfig(BaseModel):
    """Options of the search (the ``--search`` flags of ``fusion-engine train``)."""

    model_config = ConfigDict(extra="forbid")
    folds: int = Field(default=5, ge=2, description="stratified cross-validation folds")
    max_branches: int = Field(default=3, ge=1, description="largest backbone subset tried")
    time_budget: float | None = Field(default=None, gt=0, description="minutes for the selection after extraction")
    epochs: int | None = Field(
        default=None,
        ge=1,
        description=(
            "head epochs per CV fold (gradient fusions); default: enough for about 300 optimizer steps, "
            "at least 10 and at most the final training's epochs"
        ),
    )
    patience: int = Field(default=5, ge=1, description="early-stopping patience per CV fold")
    race_margin: float = Field(
        default=0.005,
        ge=0,
        description=(
            "a row trailing the best fully scored row by more than this accuracy (and 2 paired standard errors) "
            "after 2 folds stops there (0: every row gets every fold)"
        ),
    )
    min_gain: float = Field(default=0.0, ge=0, description="a larger subset must also gain this much CV accuracy")
    prefer_fewer: bool = Field(
        default=True,
        description=(
            "winner: the best row of the last accepted subset (True), or the best CV row of all, even one of a "
            "larger subset whose gain was within the fold noise (False)"
        ),
    )
    fusions: dict[str, list[dict]] | None = Field(
        default=None, description="fusion name -> option sets to try (default: every registered fusion, DEFAULT_GRID)"
    )
    screen: str | dict | None = Field(
        default=None,
        description=("fusion that scores each single backbone and each possible addition (default: concat)"),
    )
    baseline: bool = Field(default=True, description="handcrafted-features row in the leaderboard")
    held_out: bool = Field(default=True, description="score every row on the test data after the choice")
    throughput_images: int = Field(default=64, ge=1, description="images timed per backbone when features are cached")


def search_config(config: SearchConfig | None = None, **overrides) -> SearchConfig:
    """``config`` (default: SearchConfig()) with ``overrides``, validated: a misspelt option or a bad
    value is a ConfigError naming it and the valid options."""
    return validated(SearchConfig, {**(config or SearchConfig()).model_dump(), **overrides}, "search options")
