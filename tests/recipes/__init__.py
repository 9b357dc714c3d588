"""kiln's test suite (a package, so that tests/engine never shadows the engine package)."""


def kiln_in_process(*args: str) -> int:
    """``kiln ARGS`` through ``recipes.cli.commands.main`` in this process (no second torch import); its exit status.

    Not through ``recipes.cli.entry`` (the console script): its collector settings are for a process of
    its own, not for pytest's. ``KILN_MALLOC=default`` leaves the test process's allocator alone.
    """
    import pytest

    from recipes.cli import main

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KILN_MALLOC", "default")
        with pytest.raises(SystemExit) as info:
            main(list(args))
    return info.value.code
