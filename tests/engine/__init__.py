"""kiln's test suite (a package, so that tests/engine never shadows the engine package)."""
