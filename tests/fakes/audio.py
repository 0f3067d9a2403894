"""Audio the engine doubles share: mono s16 samples encoded with PyAV, and the length of an uploaded file."""

from __future__ import annotations

import io

import av


def encode(raw: bytes, rate: int, muxer: str, codec: str, frame_samples: int = 1024,
           bit_rate: int | None = None) -> bytes:
    """Mono s16le `raw` samples at `rate`, encoded with `codec` into a `muxer` file, `frame_samples` a frame."""
    n = len(raw) // 2
    buf = io.BytesIO()
    with av.open(buf, "w", format=muxer) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        if bit_rate is not None:
            stream.bit_rate = bit_rate
        for start in range(0, n, frame_samples):
            piece = raw[start * 2 : (start + frame_samples) * 2]
            frame = av.AudioFrame(format="s16", layout="mono", samples=len(piece) // 2)
            frame.planes[0].update(piece)
            frame.sample_rate, frame.pts = rate, start
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def decoded_seconds(data: bytes) -> float:
    """Seconds of audio in an uploaded file (ValueError if it is not audio)."""
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            return sum(f.samples for f in container.decode(stream)) / stream.codec_context.sample_rate
    except (av.FFmpegError, IndexError, ZeroDivisionError) as exc:
        raise ValueError("not audio") from exc
