"""Tools over runs: the LR range test (``lr_find``), the schedule preview (``schedule``) and Optuna
sweeps (``sweep``). They use ``recipes.run``; the CLI and the report use them."""
