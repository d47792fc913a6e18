"""The typed, versioned contract of ``report.json`` (``REPORT_SCHEMA`` v``REPORT_SCHEMA_VERSION``).

``audits.report.build_report`` validates what it writes against ``Report``; ``fedsecmem audit check``
reads a report through it; docs/schemas/report.schema.json is its JSON Schema (a test keeps the file
equal to the model). A change of meaning or shape bumps the version.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

REPORT_SCHEMA = "fedsecmem-privacy-report"
REPORT_SCHEMA_VERSION = 1

__all__ = ["REPORT_SCHEMA", "REPORT_SCHEMA_VERSION", "Report"]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunFacts(_Closed):
    name: str | None
    run_id: str
    method: str
    benchmark: str | None
    rounds: int | None
    folder: str
    transport: str
    code_version: str | None
    commit: str | None


class Participant(_Closed):
    client: int
    n_train: int | str  # a count under SMALL_CELL is shown as "<5", its row's other counts as "~10"
    products: dict[str, int | str]


class GroupPrivacy(_Closed):
    images: int
    epsilon: float | None
    delta: float | None


class Privacy(_Closed):
    enabled: bool
    unit: Literal["image", "patient"]
    delta: float | None = None
    noise_multiplier: float | None = None
    accountant: str | None = None
    epsilon_target: float | None = None
    noise: str | None = None
    sensitivity: float | None = None
    min_survivors: int | None = None
    releases_per_round: int | None = None
    dp_sgd: dict[str, Any] | None = None
    epsilon_max: float | None = None
    epsilon_per_client: list[float | None] = []
    epsilon_per_client_signed_by_client: list[float | None] = []
    epsilon_per_client_per_round: list[list[float | None]] = []
    history: dict[str, list[list[float | int | str]]] = {}  # client -> [[z, rate, count, kind], ...] as signed
    budget: float | None = None
    budget_left: list[float | None] = []
    stopped: dict[str, Any] | None = None
    mechanism: str | None = None
    source: str | None = None
    per_patient: list[GroupPrivacy] | None = None


class Attack(_Closed):
    view: str
    attack: str
    auc: float
    auc_ci: list[float]


class Adversary(_Closed):
    adversary: str
    assumes: str
    noise_share: float
    epsilon: float | None  # None: infinite, no guarantee
    odds_factor: float | None
    in_words: str
    measured_attack: Attack | None
    dp_bound_auc: float | None


class Release(_Closed):
    stage: str
    direction: str
    messages: int
    bytes: int
    carries: str
    from_images: bool | None
    dp: str
    seen_by: str


class Compared(_Closed):
    label: str
    folder: str
    run_id: str | None
    auroc_image: float | None


class Utility(_Closed):
    auroc_image: float | None
    auroc_pixel: float | None
    primary_score: str | None
    compared_with: list[Compared]
    per_site: list[dict[str, Any]]
    sites_worse_by_joining: list[int]
    withheld: bool


class SignedFile(_Closed):
    sha256: str
    signed_in: str


class DataLocation(_Closed):
    what: str
    where: str
    delete: str


class Reproducibility(_Closed):
    code_version: str | None
    commit: str | None
    python: str | None
    torch: str | None
    config_sha256: str | None
    seed: int | None
    noise: str | None
    data_locations: list[DataLocation]


class Report(_Closed):
    kind: Literal["fedsecmem-privacy-report"]
    schema_version: Literal[1]
    run: RunFacts
    participants: list[Participant]
    protocol: str | None
    threat_model: dict[str, Any]
    dp: Privacy
    adversaries: list[Adversary]
    dropouts: dict[int, list[int]]
    bytes: dict[str, list[int]]
    releases: list[Release]
    utility: Utility
    ledger: dict[str, Any]
    files: dict[str, SignedFile]
    leakage: dict[str, Any] | None
    reproducibility: Reproducibility
    governance: dict[str, Any]
    clients: int
    kept_at_sites: list[dict[str, Any]] = []
