"""``python -m recipes.cli ARGS`` runs the ``kiln`` command line (the same as ``kiln ARGS``)."""
from recipes.cli.entry import main

if __name__ == "__main__":  # pragma: no cover
    main()
