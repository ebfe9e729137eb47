"""The federation plan: one YAML file, loaded once into frozen dataclasses, read by both sides."""

from foedus.plans.loader import PlanError, load_plan, parse_plan
from foedus.plans.schema import (
    AggregatorSettings,
    ConnectionSettings,
    FederationSettings,
    Limits,
    Plan,
    TLSSettings,
)

__all__ = [
    "AggregatorSettings",
    "ConnectionSettings",
    "FederationSettings",
    "Limits",
    "Plan",
    "PlanError",
    "TLSSettings",
    "load_plan",
    "parse_plan",
]
