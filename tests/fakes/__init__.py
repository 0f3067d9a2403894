"""Test doubles: real servers on loopback ports that behave like the engines the gateway talks to."""
