"""Live transcripts: an engine's streamed text turned into the pieces `transcribe_live` yields (base.LiveTranscriber).

Engines stream text in their own shapes: Deepgram's final `Results` are spans of words with no space around them,
Wyoming's `transcript-chunk`s are raw text whose spaces may lead, trail or be missing mid-word. `Pieces` turns
either into append-only pieces whose concatenation is the text with its whitespace collapsed, as the file path
reports it (`" ".join(text.split())`): a space between two pieces where the engine put one (or always, for
engines whose pieces are separate spans), none before the first, no empty piece. It also bounds the text: an
engine that never stops talking is garbage, not a transcript.
"""

from __future__ import annotations

from gateway.adapters.http_engine import MAX_TRANSCRIPT_BYTES
from gateway.config import Backend
from gateway.errors import Reason, UpstreamError


class Pieces:
    """The pieces so far of one live transcript (`text`), and the next one from an engine's text."""

    def __init__(self, backend: Backend, *, spans: bool) -> None:
        self.backend = backend
        self.spans = spans
        """Each engine text is a span of its own (Deepgram): always a space between two."""
        self.text = ""
        """Every piece yielded so far, joined."""
        self._space = False  # the last engine text ended in whitespace (or was only whitespace)

    def piece(self, said: object) -> str:
        """The next piece for what the engine said ("" when it said nothing); not a string is a bad answer."""
        if not isinstance(said, str):
            raise UpstreamError(f"Backend '{self.backend.name}' sent a malformed transcript.",
                                reason=Reason.BAD_RESPONSE)
        words = said.split()
        if not words:
            self._space = self._space or bool(said)
            return ""
        lead = bool(self.text) and (self.spans or self._space or said[0].isspace())
        self._space = said[-1].isspace()
        return self._add((" " if lead else "") + " ".join(words))

    def rest(self, final: object) -> str:
        """What the engine's final transcript adds to the pieces so far: all of it when nothing was streamed,
        its tail when it extends them, else nothing (pieces are append-only; the streamed text stands)."""
        if not isinstance(final, str):
            raise UpstreamError(f"Backend '{self.backend.name}' sent a malformed transcript.",
                                reason=Reason.BAD_RESPONSE)
        whole = " ".join(final.split())
        if not whole.startswith(self.text) or len(whole) == len(self.text):
            return ""
        return self._add(whole[len(self.text):])

    def _add(self, piece: str) -> str:
        self.text += piece
        if len(self.text) > MAX_TRANSCRIPT_BYTES:
            raise UpstreamError(f"Backend '{self.backend.name}' sent an oversized transcript.",
                                reason=Reason.BAD_RESPONSE)
        return piece
