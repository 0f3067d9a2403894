"""HTTP handlers, one module per endpoint family; each reads as a sequence of named stages."""
