"""A double of Azure AI Speech on a real port: SSML text to speech, the voice list, fast transcription.

Text to speech follows /work/shared/research/native-engines.md section 6: `POST /cognitiveservices/v1`
needs `Ocp-Apim-Subscription-Key`, `Content-Type: application/ssml+xml` (else 415),
`X-Microsoft-OutputFormat` (one it knows, else 400) and a `User-Agent`; the SSML is parsed as XML
(malformed: 400), the `<voice name>` must be a listed voice, and `<prosody rate>` (a +/-percentage or
a multiplier, 0.5-2) changes the speech's length. Error answers have no body, as Azure's. The audio
is real: a 440 Hz tone of `SECONDS_PER_CHAR` per character divided by the rate, encoded with PyAV as
the output format names, streamed in `chunk_size` pieces with `chunk_delay` between them.

Fast transcription (`POST /speechtotext/transcriptions:transcribe?api-version=2024-11-15`, multipart
`audio` + `definition`) is not in the notes; it follows Microsoft's public documentation: phrases with
millisecond offsets and words, `combinedPhrases`, `durationMilliseconds` (the upload's decoded length),
and errors as `{"error": {"code", "message"}}`. `mode` selects a failure (see MODES).
"""

from __future__ import annotations

import asyncio
import json
import re
import xml.etree.ElementTree as ET
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from tests.fakes.audio import decoded_seconds
from tests.fakes.deepgram_engine import GARBAGE, tone
from tests.fakes.engine import RECORDED, FakeHttpEngine, Recorded, record

SECONDS_PER_CHAR = 0.06
MIN_SECONDS = 0.5
API_VERSION = "2024-11-15"
MODES = ("ok", "401", "429", "400", "500", "garbage", "hang", "drop_midstream")
SSML_NS = "{http://www.w3.org/2001/10/synthesis}"
# X-Microsoft-OutputFormat -> (sample rate, muxer, codec, content type)
OUTPUT_FORMATS = {
    "audio-24khz-96kbitrate-mono-mp3": (24_000, "mp3", "libmp3lame", "audio/mpeg"),
    "audio-24khz-48kbitrate-mono-mp3": (24_000, "mp3", "libmp3lame", "audio/mpeg"),
    "audio-48khz-192kbitrate-mono-mp3": (48_000, "mp3", "libmp3lame", "audio/mpeg"),
    "ogg-24khz-16bit-mono-opus": (24_000, "ogg", "libopus", "audio/ogg"),
    "ogg-48khz-16bit-mono-opus": (48_000, "ogg", "libopus", "audio/ogg"),
    "riff-24khz-16bit-mono-pcm": (24_000, "wav", "pcm_s16le", "audio/x-wav"),
    "riff-48khz-16bit-mono-pcm": (48_000, "wav", "pcm_s16le", "audio/x-wav"),
    "raw-24khz-16bit-mono-pcm": (24_000, "raw", "pcm_s16le", "application/octet-stream"),
    "raw-48khz-16bit-mono-pcm": (48_000, "raw", "pcm_s16le", "application/octet-stream"),
}
VOICES = [
    {"Name": "Microsoft Server Speech Text to Speech Voice (en-US, AvaMultilingualNeural)",
     "DisplayName": "Ava Multilingual", "LocalName": "Ava Multilingual", "ShortName": "en-US-AvaMultilingualNeural",
     "Gender": "Female", "Locale": "en-US", "LocaleName": "English (United States)", "SampleRateHertz": "24000",
     "VoiceType": "Neural", "Status": "GA", "WordsPerMinute": "156"},
    {"Name": "Microsoft Server Speech Text to Speech Voice (en-US, AndrewNeural)", "DisplayName": "Andrew",
     "LocalName": "Andrew", "ShortName": "en-US-AndrewNeural", "Gender": "Male", "Locale": "en-US",
     "LocaleName": "English (United States)", "SampleRateHertz": "24000", "VoiceType": "Neural", "Status": "GA",
     "StyleList": ["empathetic", "relieved"], "WordsPerMinute": "144"},
    {"Name": "Microsoft Server Speech Text to Speech Voice (de-DE, KatjaNeural)", "DisplayName": "Katja",
     "LocalName": "Katja", "ShortName": "de-DE-KatjaNeural", "Gender": "Female", "Locale": "de-DE",
     "LocaleName": "German (Germany)", "SampleRateHertz": "24000", "VoiceType": "Neural", "Status": "GA",
     "WordsPerMinute": "150"},
]


def speech_seconds(text: str, rate: float = 1.0) -> float:
    return round(max(MIN_SECONDS, SECONDS_PER_CHAR * len(text)) / rate, 2)


def prosody_rate(value: str | None) -> float:
    """SSML prosody rate as a multiplier: '+30.00%' / '-50%' / '30%' (relative), '1.5', or a constant."""
    constants = {"x-slow": 0.5, "slow": 0.64, "medium": 1.0, "default": 1.0, "fast": 1.55, "x-fast": 2.0}
    if value is None:
        return 1.0
    if value in constants:
        return constants[value]
    if value.endswith("%"):
        return min(2.0, max(0.5, 1 + float(value[:-1]) / 100))
    return min(2.0, max(0.5, float(value)))


class FakeAzureSpeech(FakeHttpEngine):
    MODES = MODES

    def __init__(self, *, expected_api_key: str | None = None, chunk_size: int = 4096,
                 chunk_delay: float = 0.0) -> None:
        super().__init__(expected_api_key=expected_api_key, chunk_size=chunk_size, chunk_delay=chunk_delay)
        self.spoken: list[tuple[str, str, float]] = []
        """(voice, text, rate) of each synthesis, as parsed from the SSML."""
        self.sent: list[bytes] = []
        self.app.router.add_post("/cognitiveservices/v1", self._tts)
        self.app.router.add_get("/cognitiveservices/voices/list", self._voices)
        self.app.router.add_post("/speechtotext/transcriptions:transcribe", self._transcribe)

    def _error(self, request: web.Request, status: int, code: str, message: str,
               headers: dict[str, str] | None = None) -> web.Response:
        """Speech to text explains itself in JSON; text to speech answers with the status alone."""
        if request.path.startswith("/speechtotext/"):
            return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)
        return web.Response(status=status, headers=headers)

    async def _record(self, request: web.Request) -> Recorded:
        return await record(request, parse_json=False)

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        key = request.headers.get("Ocp-Apim-Subscription-Key")
        if self.mode == "401" or (self.expected_api_key is not None and key != self.expected_api_key):
            return self._error(request, 401, "401", "Access denied due to invalid subscription key or wrong "
                               "API endpoint.")
        if self.mode == "429":
            return self._error(request, 429, "TooManyRequests", "Too many requests.",
                               {"Retry-After": self.retry_after or "7"})
        if self.mode == "400":
            return self._error(request, 400, "InvalidArgument", "Invalid audio (fake mode 400).")
        if self.mode == "500":
            return web.Response(status=500)
        if self.mode == "garbage":
            return web.Response(body=GARBAGE, content_type="text/html")
        if self.mode == "hang":
            await self._hang()
        return await handler(request)

    async def _tts(self, request: web.Request) -> web.StreamResponse:
        rec = request[RECORDED]
        if request.content_type != "application/ssml+xml":
            return web.Response(status=415)
        output = request.headers.get("X-Microsoft-OutputFormat", "")
        if output not in OUTPUT_FORMATS or not request.headers.get("User-Agent"):
            return web.Response(status=400)
        try:
            root = ET.fromstring(rec.body)
        except ET.ParseError:
            return web.Response(status=400)
        voice = root.find(f"{SSML_NS}voice")
        names = {v["ShortName"] for v in VOICES}
        if root.tag != f"{SSML_NS}speak" or voice is None or voice.get("name") not in names:
            return web.Response(status=400)
        prosody = voice.find(f"{SSML_NS}prosody")
        try:
            rate = prosody_rate(prosody.get("rate") if prosody is not None else None)
        except ValueError:
            return web.Response(status=400)
        text = "".join(voice.itertext())
        self.spoken.append((voice.get("name", ""), text, rate))
        sample_rate, muxer, codec, ctype = OUTPUT_FORMATS[output]
        audio = await asyncio.to_thread(tone, speech_seconds(text, rate), sample_rate, muxer, codec)
        self.sent.append(audio)
        return await self._send(request, {"Content-Type": ctype}, audio)

    async def _voices(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(VOICES)

    async def _transcribe(self, request: web.Request) -> web.StreamResponse:
        rec = request[RECORDED]
        if self.canned is not None:
            return self.canned.response()
        if request.query.get("api-version") != API_VERSION:
            return web.json_response({"error": {"code": "404", "message": "Resource not found"}}, status=404)
        audio = [data for name, _, _, data in rec.files if name == "audio"]
        try:
            definition = json.loads(rec.form_value("definition") or "{}")
            seconds = await asyncio.to_thread(decoded_seconds, audio[0])
        except (ValueError, IndexError):
            return web.json_response({"error": {"code": "InvalidAudioFormat", "message": "Audio format is not "
                                                "supported or the audio is corrupt."}}, status=422)
        locale = (definition.get("locales") or ["en-US"])[0]
        return await self._send(request, {"Content-Type": "application/json; charset=utf-8"},
                                json.dumps(self.result(seconds, locale)).encode())

    def result(self, seconds: float, locale: str) -> dict[str, Any]:
        """A fast-transcription answer: `transcript_text` spread evenly over `seconds`, one phrase a sentence."""
        words = self.transcript_text.split()
        step = int(seconds * 1000) // max(1, len(words))
        phrases: list[dict[str, Any]] = []
        group: list[dict[str, Any]] = []
        for i, word in enumerate(words):
            group.append({"text": re.sub(r"[.,!?]", "", word), "offsetMilliseconds": i * step,
                          "durationMilliseconds": step * 4 // 5})
            if word[-1] in ".!?" or i == len(words) - 1:
                start = group[0]["offsetMilliseconds"]
                end = group[-1]["offsetMilliseconds"] + group[-1]["durationMilliseconds"]
                text = " ".join(words[i - len(group) + 1 : i + 1])
                phrases.append({"offsetMilliseconds": start, "durationMilliseconds": end - start, "text": text,
                                "words": group, "locale": locale, "confidence": 0.93})
                group = []
        return {"durationMilliseconds": int(seconds * 1000), "combinedPhrases": [{"text": self.transcript_text}],
                "phrases": phrases}
