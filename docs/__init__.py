"""kiln's guides and the examples they show; docs.examples runs the examples (a package so tests can import it)."""
