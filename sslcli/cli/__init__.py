"""Command-line layer: parses and validates options, then calls library functions."""
