"""The gateway's tests: one package, so conftest is imported once, as tests.conftest."""
