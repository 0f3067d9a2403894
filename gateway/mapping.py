"""The mapping table at run time: public model -> ordered routes to adapters, public voice -> native voice.

A `Table` is an immutable snapshot (config + the adapters built from it). Each request takes the
current snapshot when it starts and keeps it to the end, so a reload never changes a request's
routes halfway.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.adapters.base import SPEECH, TRANSCRIPTION, TRANSLATION, Adapter
from gateway.auth import Identity
from gateway.config import Config, Model, NativeVoice, Route
from gateway.errors import InvalidRequestError, UnsupportedError, model_not_found

_MODEL_TASK = {SPEECH: "speech", TRANSCRIPTION: "transcription", TRANSLATION: "transcription"}


@dataclass(frozen=True, slots=True)
class Candidate:
    route: Route
    adapter: Adapter


@dataclass(frozen=True, slots=True)
class Table:
    config: Config
    adapters: Mapping[str, Adapter]

    def model(self, name: str, identity: Identity, task: str) -> Model:
        """The public model `name` for `task`, if it exists and this key may use it."""
        model = self.config.models.get(name)
        if model is None:
            raise model_not_found(name)
        identity.require(name)
        if model.task != _MODEL_TASK[task]:
            raise InvalidRequestError(
                f"The model `{name}` is a {model.task} model and cannot be used for {task}.",
                param="model", code="model_not_supported",
            )
        return model

    def candidates(self, model: Model, task: str) -> list[Candidate]:
        """The model's routes in failover order, keeping those whose backend can do `task`."""
        found = [Candidate(r, self.adapters[r.backend]) for r in model.routes]
        able = [c for c in found if c.adapter.capabilities.can(task)]
        if not able:
            raise UnsupportedError(
                f"The model `{model.name}` cannot do {task} on any configured backend.",
                param="model", code="unsupported_task",
            )
        return able

    def voice(self, public: str, backend: str) -> NativeVoice:
        """The backend's voice for a public voice name; unknown names pass through as native ids."""
        return self.config.voices.get(public, {}).get(backend) or NativeVoice(public)

    def public_voices(self) -> list[dict[str, str | None]]:
        return [
            {"voice": name, "backend": backend, "native_voice": v.id, "speaker": v.speaker}
            for name, per_backend in self.config.voices.items()
            for backend, v in per_backend.items()
        ]
