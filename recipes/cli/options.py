"""What the commands share: ``--set`` parsing, the one place where options meet a recipe, the flags of config
keys (built from the keys' declarations), ``--max-lr``'s type, and ``--help`` in sections."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from callbacks.nan_diagnosis import POLICIES
from engine.precision_names import PRECISIONS
from recipes.config import OPTION_KEYS, Config, ConfigError, apply_overrides, config_docs
from recipes.recipe_files import load_recipe

__all__ = ["MaxLR", "SectionedCommand", "complete_recipe", "config_option", "config_options", "option_help", "overrides",
           "parse_sets", "recipe_argument", "recipe_or_run", "resolve_config", "set_option"]


def parse_sets(pairs: Sequence[str]) -> dict[str, str]:
    """``("key=value", ...)`` from ``--set`` as a dict.

    Raises:
        ConfigError: a pair without ``=`` or without a key.
    """
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes key=value, not {pair!r}")
        result[key.strip()] = value.strip()
    return result


def overrides(sets: Sequence[str] = (), options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``--set`` pairs, then the explicit options that were given (not None), as ``{"section.key": value}``.

    Example:
        >>> overrides(["train.seed=3", "epochs=2"], {"epochs": 5, "lr": None})
        {'train.seed': '3', 'epochs': '2', 'train.epochs': 5}
    """
    result: dict[str, Any] = parse_sets(sets)
    result.update({OPTION_KEYS[k]: v for k, v in (options or {}).items() if v is not None})
    return result


def resolve_config(recipe: str, sets: Sequence[str] = (), **options: Any) -> Config:
    """RECIPE (a registered name or a .yaml/.yml recipe file) with ``--set`` overrides, then explicit options.

    Precedence, lowest first: the recipe, the recipe file, ``--set``, explicit options.
    """
    return apply_overrides(load_recipe(recipe), overrides(sets, options))


def recipe_or_run(recipe: str, sets: Sequence[str], kind: str, **options: Any) -> tuple[Config, Path]:
    """RECIPE's config (or the config.json of the run directory RECIPE) and where a tool's outputs go by
    default: the run directory itself, or ``runs/RECIPE-KIND-TIMESTAMP``.

    Raises:
        ConfigError: an unknown recipe, a bad override, or a run directory whose config.json cannot be read.
    """
    # imported here: recipes.run loads torch, and `kiln --help` should not
    from recipes.run.rundir import RunDir

    source = Path(recipe)
    if RunDir(source).config.is_file():
        from recipes.run.rundir import run_config

        return apply_overrides(run_config(source), overrides(sets, options)), source
    cfg = resolve_config(recipe, sets, **options)
    return cfg, Path("runs") / f"{cfg.name}-{kind}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def complete_recipe(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[click.shell_completion.CompletionItem]:
    """Shell completion for RECIPE: the registered recipes, then recipe files and folders (run directories)."""
    from recipes import RECIPES  # the registry's names only: nothing heavy is imported

    items = [click.shell_completion.CompletionItem(name) for name in RECIPES if name.startswith(incomplete)]
    directory, _, prefix = incomplete.rpartition("/")
    try:
        entries = sorted(Path(directory or ".").iterdir())
    except OSError:
        entries = []
    for entry in entries:
        if not entry.name.startswith(prefix) or (entry.name.startswith(".") and not prefix.startswith(".")):
            continue
        shown = f"{directory}/{entry.name}" if directory else entry.name
        if entry.is_dir():
            items.append(click.shell_completion.CompletionItem(shown + "/", type="plain"))
        elif entry.suffix in (".yaml", ".yml"):
            items.append(click.shell_completion.CompletionItem(shown))
    return items


recipe_argument = click.argument("recipe", shell_complete=complete_recipe)

set_option = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                          help="Override any config key, e.g. --set schedule.pct_start=0.3 (repeatable).")


class MaxLR(click.ParamType):
    """A positive number, or ``auto`` (run the LR range test and use its suggestion)."""

    name = "FLOAT|auto"

    def convert(self, value: object, param: object, ctx: object) -> float | str:
        """``"auto"``, or the value as a float (click reports anything else as a usage error)."""
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither a number nor 'auto'", param, ctx)  # type: ignore[arg-type]


#: What click needs beyond a flagged key's field, whose type, default and help (its ``#:`` comment) make the
#: rest of the flag: a type other than the field's, or a metavar.
CLICK_SETTINGS: dict[str, dict[str, Any]] = {
    "max_lr": {"type": MaxLR()}, "precision": {"type": click.Choice(PRECISIONS)},
    "on_nan": {"type": click.Choice(POLICIES)}, "data_dir": {"type": click.Path()},
    "weights": {"type": click.Path(dir_okay=False)}, "ema": {"metavar": "DECAY"}, "mixup": {"metavar": "ALPHA"},
    "cutmix": {"metavar": "ALPHA"}, "early_stop": {"metavar": "PATIENCE"}, "accumulation_steps": {"metavar": "K"},
    "mlflow": {"metavar": "URI"}, "mlflow_experiment": {"metavar": "NAME"},
}


@functools.cache
def _docs() -> dict[str, str]:
    return config_docs()


def option_help(key: str) -> str:
    """The help of config key ``key``'s flag: its ``#:`` comment as a sentence."""
    doc = _docs()[key]
    return doc[:1].upper() + doc[1:] + ("" if doc.endswith(".") else ".")


def _field(key: str) -> dataclasses.Field:
    section, name = key.split(".")
    section_class = next(f.default_factory for f in dataclasses.fields(Config) if f.name == section)
    return next(f for f in dataclasses.fields(section_class) if f.name == name)  # type: ignore[arg-type]


def config_option(name: str, **settings: Any) -> Callable:
    """The ``--NAME`` flag of config key ``OPTION_KEYS[NAME]``: its type from the key's field, its help from the
    field's ``#:`` comment (:func:`option_help`), None when not given (the recipe's value stands). A boolean key
    true by default gets a ``--NAME/--no-NAME`` pair, one false by default a flag that turns it on. ``settings``
    go to ``click.option`` over :data:`CLICK_SETTINGS`."""
    key, flag = OPTION_KEYS[name], "--" + name.replace("_", "-")
    field = _field(key)
    kwargs = {"help": option_help(key), **CLICK_SETTINGS.get(name, {}), **settings}
    if field.type == "bool":
        if field.default:
            return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, **kwargs)
        return click.option(flag, name, is_flag=True, default=None, **kwargs)
    kwargs.setdefault("type", {"int": int, "float": float, "str": str}[str(field.type)])
    return click.option(flag, name, **kwargs)


def config_options(*names: str) -> Callable:
    """:func:`config_option` for each of ``names`` (flags in ``OPTION_KEYS``)."""
    def decorate(command: Callable) -> Callable:
        for name in reversed(names):
            command = config_option(name)(command)
        return command

    return decorate


class SectionedCommand(click.Command):
    """A click command whose ``--help`` lists its options in titled sections instead of one long list.

    ``sections`` maps a title to the parameter names it holds, in order (``"help"`` is the help option);
    options it does not name go last, under "Other options".
    """

    def __init__(self, *args: Any, sections: Mapping[str, Sequence[str]] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sections = dict(sections)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Write each section's options under its title."""
        records = {p.name: p.get_help_record(ctx) for p in self.get_params(ctx) if isinstance(p, click.Option)}
        help_option = self.get_help_option(ctx)
        placed: set[str] = set()
        for title, names in self.sections.items():
            names = [help_option.name if n == "help" and help_option is not None else n for n in names]
            rows = [records[n] for n in names if records.get(n)]
            placed.update(names)
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
        rest = [record for name, record in records.items() if record and name not in placed]
        if rest:
            with formatter.section("Other options"):
                formatter.write_dl(rest)
