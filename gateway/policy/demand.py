"""What a request asks of the traffic policy, and which limits and budgets apply to it.

A `Demand` is what the handler knows before any backend call: the model, and the speech input's characters
(and speed) or the upload's measured seconds. Its cost under each measure, and its worst case under each
budget unit, are defined here; `applicable` finds the key's, tenant's and (tenant, model)'s rules.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.auth import Identity
from gateway.config import Config
from gateway.models import Price
from gateway.policy.rules import Budget, Limit

SPEECH_SECONDS_PER_CHARACTER = 0.2
"""Worst case of speech audio per input character at speed 1 (speech runs about 15 characters a second,
0.07 s each): what a speech request reserves of a `seconds` budget or of a price per audio minute."""
TRANSCRIPT_CHARACTERS_PER_SECOND = 50.0
"""Worst case of transcript text per second of audio (fast speech is about 20): what a transcription
reserves of a `characters` budget or of a price per million characters."""
@dataclass(frozen=True, slots=True)
class Demand:
    """What a request asks for, known before any backend is called."""

    model: str
    speech: bool
    characters: int = 0
    audio_seconds: float = 0.0
    speed: float = 1.0
    session: bool = False
    """A realtime session opening: only `sessions` limits apply to it (its items are demands of their own)."""

    def cost(self, measure: str) -> float | None:
        """What it costs a limit of `measure`, or None when that limit does not apply to it."""
        if self.session or measure == "sessions":
            return 1.0 if self.session and measure == "sessions" else None
        if measure in ("requests", "concurrent"):
            return 1.0
        if measure == "characters":
            return float(self.characters) if self.speech else None
        if measure == "audio_seconds":
            return None if self.speech else self.audio_seconds
        return 0.0 if self.speech else None  # speech_seconds: room checked now, counted once it is over

    def worst_case(self, unit: str, price: Price | None) -> float:
        if self.session:
            return 0.0
        if self.speech:
            characters, seconds = float(self.characters), self.characters * SPEECH_SECONDS_PER_CHARACTER / self.speed
        else:
            characters, seconds = self.audio_seconds * TRANSCRIPT_CHARACTERS_PER_SECOND, self.audio_seconds
        if unit == "characters":
            return characters
        if unit == "seconds":
            return seconds
        return 0.0 if price is None else price.cost(characters, seconds)


@dataclass(frozen=True, slots=True)
class Applied:
    """A limit or a budget as it applies to one request: its level and the scope it is counted in."""

    level: str
    scope: str
    rule: Limit | Budget

    @property
    def label(self) -> str:
        """`key:requests/minute`, `tenant:budget/month`: the metrics' `limit` and the ledger's `rejected_by`."""
        if isinstance(self.rule, Budget):
            return f"{self.level}:budget/{self.rule.period.name}"
        return f"{self.level}:{self.rule.name}"


def applicable(config: Config, identity: Identity, demand: Demand) -> list[Applied]:
    """Every limit and budget on this request: its key's, its tenant's, and its tenant's on the model
    (each level's own, else the level's default)."""
    policy, tenant_name = config.policy, identity.tenant
    tenant = policy.tenants.get(tenant_name)
    key_limits = identity.rules.limits
    tenant_limits = tenant.rules.limits if tenant is not None else None
    model_limits = tenant.models.get(demand.model) if tenant is not None else None
    if model_limits is None and demand.model in config.models:
        model_limits = config.models[demand.model].limits
    levels = (
        ("key", f"key:{identity.key_name}", policy.defaults.get("key", ()) if key_limits is None else key_limits),
        ("tenant", f"tenant:{tenant_name}", policy.defaults.get("tenant", ()) if tenant_limits is None
         else tenant_limits),
        ("model", f"model:{len(tenant_name)}:{tenant_name}:{demand.model}",
         policy.defaults.get("model", ()) if model_limits is None else model_limits),
    )
    applied = [Applied(level, scope, limit) for level, scope, limits in levels for limit in limits
               if demand.cost(limit.measure) is not None]
    if identity.rules.budget is not None:
        applied.append(Applied("key", f"key:{identity.key_name}", identity.rules.budget))
    if tenant is not None and tenant.rules.budget is not None:
        applied.append(Applied("tenant", f"tenant:{tenant_name}", tenant.rules.budget))
    return applied
