"""The typed view of a bundle's `bundle.json`: what `isl train`, `isl configure` and retraining record, read through
named fields instead of string keys. The file stays the record (ISLBundle.meta is what is written); these models
read it, keep any field they do not name (`extra="allow"`: older and newer bundles load alike) and never write."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Decision(_Record):
    """What refinement returns for this bundle, and why (the configuration's verdict on validation cases)."""

    method: str
    reason: str
    configured: bool | None = None  # False: too few cases to configure on; None: searched (or never recorded)


UNCONFIGURED = Decision(method="isl", reason="the bundle was not configured (trained with --validation 0 or "
                                            "--no-configure): ISL with the ISLConfig defaults, unchecked on this data")


class Refinement(_Record):
    """The configuration record: the chosen ISLConfig fields, the decision, and the search behind it."""

    config: dict = Field(default_factory=dict)
    decision: Decision | None = None
    validation_cases: list[str] = Field(default_factory=list)
    table: list[dict] = Field(default_factory=list)
    per_label: dict[str, dict] = Field(default_factory=dict)
    grid: dict = Field(default_factory=dict)
    global_alignment: dict | None = None  # the global stage's choice (configure.choose_global_stage); None: not made
    seconds: int | float | None = None
    budget_seconds: int | float | None = None


class BundleMeta(_Record):
    """`bundle.json`: identity, data splits, training record, configuration and, for a retrained version, its
    lineage, corrections and promotion verdict."""

    version: str
    name: str | None = None
    command: str | None = None
    created: str | None = None
    dataset: dict = Field(default_factory=dict)
    train_cases: list[str] = Field(default_factory=list)
    holdout_cases: list[str] = Field(default_factory=list)
    validation_cases: list[str] = Field(default_factory=list)
    atlases: list[str] = Field(default_factory=list)
    label_notes: list[str] = Field(default_factory=list)
    config: dict = Field(default_factory=dict)
    training: dict = Field(default_factory=dict)
    refinement: Refinement | None = None
    transfer: dict | None = None
    ensemble: dict | None = None
    parent: str | None = None
    lineage: list[str] = Field(default_factory=list)
    corrections: list[str] = Field(default_factory=list)
    held_back_corrections: list[str] = Field(default_factory=list)
    promotion: dict | None = None

    @property
    def decision(self) -> Decision:
        """The configuration's decision, or UNCONFIGURED for a bundle never configured."""
        return (self.refinement and self.refinement.decision) or UNCONFIGURED

    @property
    def used_cases(self) -> set[str]:
        """Every case the bundle trained on, uses as an atlas or configured on: never an evaluation case."""
        chosen = self.refinement.validation_cases if self.refinement else []
        return set(self.train_cases) | set(self.atlases) | set(self.validation_cases) | set(chosen)
