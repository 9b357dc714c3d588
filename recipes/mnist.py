"""The mnist recipe: MNIST from its IDX files (--data-dir DIR), held in memory; crops, no flips."""
import dataclasses

from recipes.fashion_mnist import CONFIG as FASHION_MNIST

__all__ = ["CONFIG"]

#: Fashion-MNIST's recipe on digits: the same files, sizes, model and optimizer, but no flips (a mirrored digit
#: is another digit), no erasing (a rectangle can cut the stroke that tells a 7 from a 1) and 12 epochs, as the
#: fashion-mnist recipe had before it grew to 24 with erasing (nothing has tuned this one on MNIST since), and
#: no default folder (nothing installs MNIST here).
CONFIG = dataclasses.replace(
    FASHION_MNIST, name="mnist",
    description="small CNN on MNIST (--data-dir DIR with its four IDX files, torchvision's layout too), crops only",
    data=dataclasses.replace(FASHION_MNIST.data, dataset="mnist", augment="crop", erase=0.0),
    train=dataclasses.replace(FASHION_MNIST.train, epochs=12),
)
