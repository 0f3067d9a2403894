"""An OpenAI-compatible audio gateway: the OpenAI audio API in front, native speech engines behind."""

__version__ = "0.1.0"
