"""Audio work the engines don't do: formats, transcoding, speed, decoding uploads, rendering transcripts."""
