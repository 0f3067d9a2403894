"""OpenAI's realtime transcription over WebSocket (`GET /v1/realtime?intent=transcription`), in front of every engine.

- endpoint.py  the upgrade: the checks OpenAI makes, auth (gateway key or ephemeral token), the session's slot
- session.py   one session: client events in, server events out, the input buffer, committing items
- items.py     one committed item transcribed through the model's routes, its deltas, completion and bill
- passthrough.py  a session relayed to an engine that speaks OpenAI's realtime itself
- secrets.py   `POST /v1/realtime/client_secrets`: ephemeral `ek_` tokens for browsers
- billing.py   sessions and items under the traffic policy; each item billed on its own
- settings.py  the session's configuration as a client sets it with `session.update`, validated as OpenAI does
- audio.py     appended audio decoded (PCM16 24 kHz, G.711 mu-law and A-law) and bounded; an item as a WAV file
- vad.py       server VAD: WebRTC's voice-activity detector deciding where items start and end
- events.py    server events and ids in OpenAI's shapes

Each committed item is transcribed through the model's routes like an uploaded file (gateway/handlers/routing.py:
failover, retries, ejection, admission slots), billed per item, written to the ledger per item.
Wire contract: ../shared/research/realtime-transcription.md; docs/realtime.md.
"""

PATH = "/v1/realtime"
