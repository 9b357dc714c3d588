"""Recipe files: a YAML file naming a base recipe and the keys it changes.

.. code-block:: yaml

    base: cifar10            # a registered recipe, or another recipe file (relative to this one)
    name: cifar10-short      # optional; defaults to the file's name
    train:
      epochs: 5
    schedule.max_lr: 0.01    # dotted keys work too

Every key is checked: an unknown one is refused with the valid keys and a did-you-mean. What
``kiln show RECIPE`` prints is a valid body for such a file (add a ``base:`` line). Precedence,
lowest first: the base recipe, the file, ``--set``, explicit options.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from recipes.config import SECTIONS, Config, ConfigError, apply_overrides
from recipes.config.keys import closest, did_you_mean, resolve_key

__all__ = ["is_recipe_file", "load_recipe", "load_recipe_file", "flatten_recipe"]

_TOP_LEVEL = ("base", "name", "description")


def is_recipe_file(recipe: str) -> bool:
    """Whether the RECIPE argument names a file (``.yaml``/``.yml``) rather than a registered recipe."""
    return recipe.lower().endswith((".yaml", ".yml"))


def load_recipe(recipe: str) -> Config:
    """A registered recipe by name, or the config a recipe file resolves to.

    Raises:
        ConfigError: an unknown name, a missing or invalid file, an unknown key or a bad value (one line).
    """
    from recipes import get_recipe

    if is_recipe_file(recipe):
        return load_recipe_file(recipe)
    return get_recipe(recipe)


def _valid_keys(cfg: Config, section: str) -> list[str]:
    return [f.name for f in fields(getattr(cfg, section))]


def _unknown(where: str, key: str, candidates: list[str], listed: list[str], what: str) -> ConfigError:
    return ConfigError(f"{where}: unknown key {key!r}{did_you_mean(key, candidates)} ({what}: {', '.join(listed)})")


def flatten_recipe(data: Mapping[str, Any], base: Config, where: str = "recipe file") -> dict[str, Any]:
    """``{"section.key": value}`` from a recipe file's mapping (nested sections or dotted keys), checked.

    ``base``, ``name`` and ``description`` are left out of the result except name and description.

    Raises:
        ConfigError: a key that is not a section, a ``section.key`` or a top-level key, with a did-you-mean.
    """
    paths = [f"{s}.{k}" for s in SECTIONS for k in _valid_keys(base, s)]
    flat: dict[str, Any] = {}

    def add(section: str, key: str, value: Any) -> None:
        try:  # a key renamed since the file was written resolves to its new name
            section, key = resolve_key(base, f"{section}.{key}", bare=False)
        except ConfigError:  # in a file's words: the section's valid keys
            valid = _valid_keys(base, section)
            raise _unknown(where, f"{section}.{key}", [f"{section}.{k}" for k in valid] + paths, valid,
                           f"valid keys of {section}") from None
        flat[f"{section}.{key}"] = value

    for key, value in data.items():
        key = str(key)
        if key in _TOP_LEVEL:
            if key != "base":
                flat[key] = value
        elif key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: {key} must be a mapping of keys to values, not {value!r}")
            for name, item in value.items():
                add(key, str(name), item)
        elif "." in key and key.split(".", 1)[0] in SECTIONS:
            section, name = key.split(".", 1)
            add(section, name, value)
        else:
            bare = [p for p in paths if p.split(".", 1)[1] == key]
            if len(bare) != 1 and closest(key, [*_TOP_LEVEL, *SECTIONS]):  # a misspelt section, e.g. trian
                bare = []
            elif len(bare) != 1:  # a misspelt field name without its section, e.g. epohcs: the closest field
                close = closest(key.rsplit(".", 1)[-1], [p.split(".", 1)[1] for p in paths])
                bare = [p for p in paths if close and p.split(".", 1)[1] == close]
            if len(bare) == 1:  # a field name without its section: say which section it belongs to
                field_name = bare[0].split(".", 1)[1]
                raise ConfigError(f"{where}: unknown key {key!r}; did you mean {bare[0]!r}? "
                                  f"(keys go in their section: {bare[0].split('.')[0]}: {{{field_name}: ...}})")
            raise _unknown(where, key, list(_TOP_LEVEL) + list(SECTIONS) + paths, list(_TOP_LEVEL) + list(SECTIONS),
                           "valid top-level keys")
    return flat


def load_recipe_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> Config:
    """The config of a recipe file: its ``base`` recipe with the file's keys applied.

    Raises:
        ConfigError: a missing or unreadable file, invalid YAML, no ``base``, an unknown key (with the
            valid keys and a did-you-mean), or a value the config refuses.
    """
    from recipes import RECIPES, get_recipe

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no recipe file at {path}")
    resolved = path.resolve()
    if resolved in _seen:
        raise ConfigError(f"{path}: recipe files name each other as base in a loop")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} must hold a mapping (base: RECIPE, then sections or section.key: value)")
    base_name = data.get("base")
    if not base_name:
        raise ConfigError(f"{path} names no base recipe: add a line `base: NAME` "
                          f"(one of {', '.join(sorted(RECIPES))}, or another recipe file)")
    base_name = str(base_name)
    if is_recipe_file(base_name):
        base_path = Path(base_name) if Path(base_name).is_absolute() else path.parent / base_name
        base = load_recipe_file(base_path, (*_seen, resolved))
    else:
        try:
            base = get_recipe(base_name)
        except ConfigError as e:
            raise ConfigError(f"{path}: base: {e}") from None
    flat = flatten_recipe(data, base, where=str(path))
    flat.setdefault("name", path.stem)
    try:
        return apply_overrides(base, flat)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
