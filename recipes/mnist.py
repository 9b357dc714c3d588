"""The mnist recipe: MNIST from its IDX files (--data-dir DIR), held in memory; crops, no flips."""
import dataclasses

from recipes.fashion_mnist import CONFIG as FASHION_MNIST

__all__ = ["CONFIG"]

#: Fashion-MNIST's recipe on digits: the same files, sizes and model, but no flips (a mirrored digit is
#: another digit) and no default folder (nothing installs MNIST here).
CONFIG = dataclasses.replace(
    FASHION_MNIST, name="mnist",
    description="small CNN on MNIST (--data-dir DIR with its four IDX files, torchvision's layout too), crops only",
    data=dataclasses.replace(FASHION_MNIST.data, dataset="mnist", augment="crop"),
)
