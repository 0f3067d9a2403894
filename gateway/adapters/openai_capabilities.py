"""What one `openai` backend's server really speaks (`backends.<b>.capabilities`) and the names it reads
(`backends.<b>.fields`), parsed with YAML-path errors.

OpenAI-compatible servers implement parts of OpenAI's audio API: Kokoro-FastAPI ignores `stream_format`,
vLLM streams SSE speech for pcm and wav only, faster-whisper-server answers json and verbose_json only and
reads the model from `model_name`. A backend declares what its server does; the defaults are OpenAI's. The
declaration becomes the adapter's `Capabilities`, so the core fills each gap as it does for other kinds
(transcodes a missing speech format, frames SSE itself, renders a missing transcript format, refuses word
timestamps, emulates a transcript stream), and the adapter asks the server only for what it declared.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.adapters.base import SPEECH, TRANSCRIPTION, TRANSLATION, Capabilities
from gateway.audio.formats import SPEECH_FORMATS
from gateway.config import Backend
from gateway.validation import GRANULARITIES

TRANSCRIPT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt", "diarized_json")
KNOWN = ("speech_formats", "speech_sse", "transcript_formats", "transcript_stream", "timestamp_granularities",
         "translation", "languages", "max_input_chars")


@dataclass(frozen=True, slots=True)
class Declared:
    """One server's declaration. Defaults: all of OpenAI's audio API (what the adapter assumed before)."""

    speech_formats: frozenset[str] = frozenset(SPEECH_FORMATS)
    """Speech formats it produces ([]: it does not synthesize; its routes never get speech)."""
    sse_formats: frozenset[str] = frozenset(SPEECH_FORMATS)
    """Speech formats it streams as OpenAI's SSE; for the others the gateway asks for raw audio and frames it."""
    transcript_formats: frozenset[str] = frozenset(TRANSCRIPT_FORMATS)
    """Transcript formats it answers ([]: it does not transcribe); the others are rendered from its JSON."""
    transcript_stream: bool = True
    """It answers `stream=true` with transcript events; else the gateway streams its finished transcript."""
    granularities: frozenset[str] = frozenset(GRANULARITIES)
    translation: bool = True
    languages: frozenset[str] | None = None
    max_input_chars: int | None = None
    fields: Mapping[str, str] = field(default_factory=dict)
    """OpenAI's request field name -> the server's, for JSON speech bodies and multipart forms."""

    def capabilities(self, base: Capabilities) -> Capabilities:
        """The kind's capabilities (`base`) narrowed to what this server declared."""
        tasks = ({SPEECH} if self.speech_formats else set()) | ({TRANSCRIPTION} if self.transcript_formats else set())
        if self.transcript_formats and self.translation:
            tasks.add(TRANSLATION)
        return replace(base, tasks=frozenset(tasks), speech_formats=self.speech_formats,
                       speech_sse=bool(self.sse_formats), transcript_formats=self.transcript_formats,
                       word_timestamps="word" in self.granularities, languages=self.languages)

    def transcript_format(self, wanted: str) -> str:
        """The format to ask the server for: `wanted` if it has it, else JSON the gateway renders from."""
        if wanted in self.transcript_formats:
            return wanted
        return "verbose_json" if "verbose_json" in self.transcript_formats else "json"

    def renamed(self, name: str) -> str:
        return self.fields.get(name, name)


def declared(backend: Backend) -> Declared:
    """`backends.<b>.capabilities` and `.fields`, checked by YAML path (ValueError, as adapters raise)."""
    path = f"backends.{backend.name}"
    caps = backend.options.get("capabilities")
    if caps is None:
        caps = {}
    if not isinstance(caps, dict):
        raise ValueError(f"{path}.capabilities: expected a mapping, got {type(caps).__name__}")
    path = f"{path}.capabilities"
    unknown = sorted(str(k) for k in set(caps) - set(KNOWN))
    if unknown:
        raise ValueError(f"{path}.{unknown[0]}: unknown capability (known: {', '.join(KNOWN)})")
    base = Declared()
    speech = _names(caps, "speech_formats", path, SPEECH_FORMATS, base.speech_formats)
    sse = caps.get("speech_sse", True)
    if isinstance(sse, bool):
        sse_formats = speech if sse else frozenset()
    else:
        sse_formats = _names(caps, "speech_sse", path, SPEECH_FORMATS, frozenset())
        if not sse_formats <= speech:
            raise ValueError(f"{path}.speech_sse: {sorted(sse_formats - speech)[0]} is not in speech_formats")
    transcripts = _names(caps, "transcript_formats", path, TRANSCRIPT_FORMATS, base.transcript_formats)
    if transcripts and not transcripts & {"json", "verbose_json"}:  # []: it does not transcribe
        raise ValueError(f"{path}.transcript_formats: needs json or verbose_json (the gateway renders the "
                         "other formats from it)")
    timed = base.granularities if "verbose_json" in transcripts else frozenset()  # timings come in verbose_json
    granularities = _names(caps, "timestamp_granularities", path, GRANULARITIES, timed)
    if "word" in granularities and "verbose_json" not in transcripts:
        raise ValueError(f"{path}.timestamp_granularities: word timings come in verbose_json, which is not in "
                         "transcript_formats")
    languages = None
    if caps.get("languages") is not None:
        languages = _names(caps, "languages", path, None, frozenset())
    limit = caps.get("max_input_chars")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"{path}.max_input_chars: expected a whole number of at least 1, got {limit!r}")
    return Declared(speech, sse_formats, transcripts, _flag(caps, "transcript_stream", path),
                    granularities, _flag(caps, "translation", path), languages, limit, _fields(backend))


def _flag(node: dict[str, Any], key: str, path: str) -> bool:
    value = node.get(key, True)
    if not isinstance(value, bool):
        raise ValueError(f"{path}.{key}: expected true or false, got {value!r}")
    return value


def _names(node: dict[str, Any], key: str, path: str, allowed: tuple[str, ...] | None,
           default: frozenset[str]) -> frozenset[str]:
    """A list of names, each one of `allowed` (None: any non-empty string, lower-cased)."""
    if key not in node:
        return default
    value = node[key]
    if not isinstance(value, list):
        raise ValueError(f"{path}.{key}: expected a list, got {value!r}")
    found = set()
    for i, name in enumerate(value):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{path}.{key}[{i}]: expected a name, got {name!r}")
        if allowed is not None and name not in allowed:
            raise ValueError(f"{path}.{key}[{i}]: unknown {name!r} (one of: {', '.join(allowed)})")
        found.add(name if allowed is not None else name.strip().lower())
    return frozenset(found)


def _fields(backend: Backend) -> dict[str, str]:
    path = f"backends.{backend.name}.fields"
    fields = backend.options.get("fields")
    if fields is None:
        return {}
    if not isinstance(fields, dict):
        raise ValueError(f"{path}: expected a mapping of OpenAI's field names to the server's, got {fields!r}")
    for name, renamed in fields.items():
        if not isinstance(name, str) or not name or not isinstance(renamed, str) or not renamed:
            raise ValueError(f"{path}.{name}: expected a field name, got {renamed!r}")
    if len(set(fields.values())) < len(fields):
        raise ValueError(f"{path}: two fields renamed to the same name")
    return dict(fields)
