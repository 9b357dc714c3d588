"""kiln's recipes: configs, data, models, the run assembly and the CLI."""
from recipes import cifar10, digits, imagefolder, synthetic
from recipes.config import Config, ConfigError

__all__ = ["RECIPES", "get_recipe"]

#: Every named recipe, by name. A plain dict: grep it, no registration side effects.
RECIPES: dict[str, Config] = {
    "digits": digits.CONFIG,
    "synthetic": synthetic.CONFIG,
    "cifar10": cifar10.CONFIG,
    "imagefolder": imagefolder.CONFIG,
}


def get_recipe(name: str) -> Config:
    """The recipe called ``name``.

    Raises:
        ConfigError: no such recipe (the message lists the known ones).
    """
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}") from None
