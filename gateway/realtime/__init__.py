"""OpenAI's realtime API, transcription sessions (issue 16)."""
