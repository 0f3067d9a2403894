"""ElevenLabs: text to speech over `/v1/text-to-speech/{voice_id}/stream`, speech to text with Scribe.

Speech asks for the `output_format` that needs the least work from the gateway: `mp3_44100_128`
(ElevenLabs' default, on every plan) for mp3 and `pcm_24000` (exactly OpenAI's pcm) for pcm, both
relayed untouched; every other format is encoded by the gateway from `pcm_24000`. OpenAI `speed`
within ElevenLabs' 0.7-1.2 goes to `voice_settings.speed`; outside it the gateway time-stretches.

Scribe's words (`type: word`; spacing and audio events dropped) become the transcript's words, and
the gateway's renderer groups them into segments. Scribe has no translation task.

Backend options: `voice_settings` (stability, similarity_boost, style, use_speaker_boost sent with
every speech request), `optimize_streaming_latency` (0-4), `enable_logging` (false: zero retention).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import quote

import aiohttp

from gateway.adapters.base import (
    SPEECH,
    TRANSCRIPTION,
    AudioStream,
    Capabilities,
    SpeechJob,
    TranscriptionJob,
    check_options,
    upstream_errors,
)
from gateway.adapters.engine_errors import Complaint
from gateway.adapters.http_engine import probe, raise_for_status, read_transcript, request_timeout, stream_body
from gateway.audio.formats import AudioFormat, pcm
from gateway.config import Backend
from gateway.errors import GatewayError, Reason, UpstreamError
from gateway.transcript import Transcript, Word, seconds

DEFAULT_URL = "https://api.elevenlabs.io"
SPEED_RANGE = (0.7, 1.2)
"""voice_settings.speed: "to a minimum of 0.7 ... to a maximum of 1.2" (ElevenLabs' voice settings docs)."""
PCM_FORMAT = "pcm_24000"
OUTPUT_FORMATS: Mapping[str, tuple[str, AudioFormat]] = {
    "mp3": ("mp3_44100_128", AudioFormat("mp3", 44_100)),
    "pcm": (PCM_FORMAT, pcm(24_000)),
}
"""OpenAI response_format -> ElevenLabs output_format whose bytes are already that format."""
_VOICE_SETTINGS = {"stability": float, "similarity_boost": float, "style": float, "use_speaker_boost": bool}
_OPTIONS = {"voice_settings", "optimize_streaming_latency", "enable_logging"}
_FIELDS = {"text": "input", "model_id": "model", "voice_id": "voice", "language_code": "language",
           "max_character_limit_exceeded": "input", "voice_not_found": "voice", "model_not_found": "model"}
"""ElevenLabs' field names (FastAPI validation `loc`) and error statuses -> the OpenAI field the client sent."""
# Scribe answers ISO-639-3 codes ("eng"); the transcript carries ISO-639-1 where one exists.
_ISO1 = dict(pair.split(":") for pair in """
    eng:en zho:zh cmn:zh chi:zh deu:de ger:de spa:es rus:ru kor:ko fra:fr fre:fr jpn:ja por:pt tur:tr pol:pl
    cat:ca nld:nl dut:nl ara:ar swe:sv ita:it ind:id hin:hi fin:fi vie:vi heb:he ukr:uk ell:el gre:el msa:ms
    may:ms zsm:ms ces:cs cze:cs ron:ro rum:ro dan:da hun:hu tam:ta nor:no nob:nb nno:nn tha:th urd:ur hrv:hr
    bul:bg lit:lt lat:la mri:mi mao:mi mal:ml cym:cy wel:cy slk:sk slo:sk tel:te fas:fa per:fa pes:fa lav:lv
    ben:bn srp:sr aze:az slv:sl kan:kn est:et mkd:mk mac:mk bre:br eus:eu baq:eu isl:is ice:is hye:hy arm:hy
    nep:ne mon:mn bos:bs kaz:kk sqi:sq alb:sq swa:sw glg:gl mar:mr pan:pa sin:si khm:km sna:sn yor:yo som:so
    afr:af oci:oc kat:ka geo:ka bel:be tgk:tg snd:sd guj:gu amh:am yid:yi lao:lo uzb:uz fao:fo hat:ht pus:ps
    tuk:tk mlt:mt san:sa ltz:lb mya:my bur:my bod:bo tib:bo tgl:tl mlg:mg asm:as tat:tt lin:ln hau:ha bak:ba
    jav:jv sun:su gle:ga ibo:ig kir:ky lug:lg nya:ny orm:om ory:or wol:wo xho:xh zul:zu kur:ku
""".split())


class ElevenLabsAdapter:
    kind: ClassVar[str] = "elevenlabs"
    capabilities = Capabilities(
        tasks=frozenset({SPEECH, TRANSCRIPTION}),
        speech_formats=frozenset(OUTPUT_FORMATS),
        native_speed=SPEED_RANGE,
        word_timestamps=True,
    )

    def __init__(self, backend: Backend, http: aiohttp.ClientSession) -> None:
        self.backend = backend
        self.http = http
        self.url = backend.url or DEFAULT_URL
        self.timeout = request_timeout(backend)
        self.voice_settings, self.query = _options(backend)

    def _headers(self) -> dict[str, str]:
        """The backend's key, and no compression: the gateway's session does not decompress."""
        headers = {"Accept-Encoding": "identity"}
        if self.backend.api_key:
            headers["xi-api-key"] = self.backend.api_key
        return headers

    async def synthesize(self, job: SpeechJob) -> AudioStream:
        output_format, audio_format = OUTPUT_FORMATS.get(job.response_format, OUTPUT_FORMATS["pcm"])
        body: dict[str, Any] = {"text": job.input, "model_id": job.model}
        settings = dict(self.voice_settings)
        if job.speed != 1.0:
            settings["speed"] = job.speed
        if settings:
            body["voice_settings"] = settings
        url = f"{self.url}/v1/text-to-speech/{quote(job.voice.id, safe='')}/stream"
        with upstream_errors(self.backend):
            response = await self.http.post(url, params={"output_format": output_format, **self.query}, json=body,
                                            headers=self._headers(), timeout=self.timeout)
        await raise_for_status(self.backend, response, fields=_FIELDS, refine=self._refine)
        if response.content_type.startswith(("text/", "application/json")):
            response.release()
            raise UpstreamError(f"Backend '{self.backend.name}' answered with {response.content_type} instead of "
                                "audio.", reason=Reason.BAD_RESPONSE)
        return AudioStream(audio_format, stream_body(self.backend, response), speed_applied=True)

    async def transcribe(self, job: TranscriptionJob) -> Transcript:
        form = aiohttp.FormData(quote_fields=False)
        form.add_field("model_id", job.model)
        if job.language:
            form.add_field("language_code", job.language)
        if job.temperature is not None:
            form.add_field("temperature", str(job.temperature))
        form.add_field("timestamps_granularity", "word")
        form.add_field("tag_audio_events", "false")  # Whisper has no "(laughter)" in its text
        form.add_field("file", job.upload.payload(), filename=job.upload.filename,
                       content_type=job.upload.content_type)
        with upstream_errors(self.backend):
            response = await self.http.post(f"{self.url}/v1/speech-to-text", params=self.query, data=form,
                                            headers=self._headers(), timeout=self.timeout)
        await raise_for_status(self.backend, response, fields=_FIELDS, refine=self._refine)
        body = await read_transcript(self.backend, response)
        transcript = _transcript(body)
        if transcript is None:
            raise UpstreamError(f"Backend '{self.backend.name}' answered with a malformed transcript.",
                                reason=Reason.BAD_RESPONSE)
        return transcript

    def _refine(self, said: Complaint) -> GatewayError | None:
        """ElevenLabs' exhausted quota is a refused credential that no retry fixes, with its own words."""
        if said.status in (401, 403) and said.code == "quota_exceeded":
            return UpstreamError(f"Backend '{self.backend.name}' has used up its ElevenLabs quota.",
                                 reason=Reason.BACKEND_AUTH, should_retry=False)
        return None

    async def ready(self) -> bool:
        """GET /v1/voices with the backend's key: free, and fails when the key is refused."""
        return await probe(self.backend, self.http, f"{self.url}/v1/voices", self._headers())

    async def aclose(self) -> None:
        return None


def _options(backend: Backend) -> tuple[dict[str, Any], dict[str, str]]:
    """(voice_settings for every speech request, query parameters for every request) from the backend's options."""
    path = f"backends.{backend.name}"
    check_options(backend, _OPTIONS)
    raw = backend.options.get("voice_settings") or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}.voice_settings: expected a mapping")
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        kind = _VOICE_SETTINGS.get(key)
        if kind is None:
            raise ValueError(f"{path}.voice_settings.{key}: expected one of {sorted(_VOICE_SETTINGS)} "
                             "(speed comes from each request)")
        if kind is bool and not isinstance(value, bool):
            raise ValueError(f"{path}.voice_settings.{key}: expected true or false")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
            raise ValueError(f"{path}.voice_settings.{key}: expected a number from 0 to 1")
        settings[key] = value
    query: dict[str, str] = {}
    latency = backend.options.get("optimize_streaming_latency")
    if latency is not None:
        if isinstance(latency, bool) or latency not in range(5):
            raise ValueError(f"{path}.optimize_streaming_latency: expected an integer from 0 to 4")
        query["optimize_streaming_latency"] = str(latency)
    retention = backend.options.get("enable_logging")
    if retention is not None:
        if not isinstance(retention, bool):
            raise ValueError(f"{path}.enable_logging: expected true or false")
        query["enable_logging"] = "true" if retention else "false"
    return settings, query


def _transcript(body: bytes) -> Transcript | None:
    """Scribe's single-channel answer as a Transcript; None if it is not one."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("text"), str):
        return None
    words = []
    for w in parsed.get("words") or ():
        if not (isinstance(w, dict) and w.get("type", "word") == "word" and isinstance(w.get("text"), str)):
            continue
        try:
            start, end = seconds(w.get("start")), seconds(w.get("end"))
        except ValueError:  # a word without usable timings: the renderers time the text around it
            continue
        words.append(Word(w["text"], start, end))  # as Scribe said it ("jumps."): gateway.transcript.normalize
    code = parsed.get("language_code")
    language = _ISO1.get(code.lower(), code) if isinstance(code, str) and code else None
    return Transcript(parsed["text"].strip(), language, _duration(parsed.get("audio_duration_secs")),
                      words=tuple(words))


def _duration(value: object) -> float | None:
    try:
        return seconds(value)
    except ValueError:
        return None
