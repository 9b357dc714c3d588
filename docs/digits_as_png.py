"""Write the digits recipe's validation images as the 8x8 8-bit PNG files they are: OUT/LABEL/NNNN.png.

Usage: python docs/digits_as_png.py OUT [--all]   (NNNN is the image's position in the validation split;
with --all, every one of the 1797 images, NNNN its position in the data set)

The `kiln predict` examples of docs/use-the-model.md and docs/watch.md classify these; their predictions reproduce
`kiln eval`'s accuracy.
"""
import argparse
from pathlib import Path

import torch
from PIL import Image

from recipes import get_recipe
from recipes.data import split_indices
from recipes.data.digits import digits_tensors

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out", type=Path, help="the folder to write OUT/LABEL/NNNN.png under")
parser.add_argument("--all", action="store_true", help="all 1797 images, not only the validation split's 359")
args = parser.parse_args()
out = args.out
cfg = get_recipe("digits")
x, y = digits_tensors(8)  # 8x8, in [0, 1], 8-bit values
_, val_idx = split_indices(len(x), cfg.data.val_fraction, cfg.train.seed)
if args.all:
    val_idx = torch.arange(len(x))
for n, i in enumerate(val_idx.tolist()):
    (out / str(int(y[i]))).mkdir(parents=True, exist_ok=True)
    Image.fromarray((x[i, 0] * 255).round().to(torch.uint8).numpy(), mode="L").save(out / str(int(y[i])) / f"{n:04d}.png")
print(f"wrote {len(val_idx)} PNG files under {out}")
