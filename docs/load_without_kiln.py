"""Classify images with a model from `kiln export` (.ts or .pt2), using torch and torchvision only.

Usage: python load_without_kiln.py MODEL_FILE IMAGE...   (prints CLASS PROBABILITY, one line per image)
"""
import json
import sys

import torch
import torchvision.transforms.functional as F
from PIL import Image

model_file, images = sys.argv[1], sys.argv[2:]
extra = {"kiln.json": ""}  # filled in by the loader: the class names and preprocessing kiln wrote
if model_file.endswith(".pt2"):
    model = torch.export.load(model_file, extra_files=extra).module()
else:
    model = torch.jit.load(model_file, map_location="cpu", _extra_files=extra)
meta = json.loads(extra["kiln.json"])
p = meta["preprocessing"]
how = F.InterpolationMode(p.get("interpolation", "bilinear"))  # bicubic for some pretrained weights
for image in images:
    x = F.to_tensor(Image.open(image).convert(p["mode"]))
    if p["resize"] is None:
        x = F.resize(x, [p["size"], p["size"]], interpolation=how, antialias=True)
    else:
        x = F.center_crop(F.resize(x, p["resize"], interpolation=how, antialias=True), p["size"])
    x = F.normalize(x, p["mean"], p["std"])
    with torch.no_grad():
        probabilities = model(x.unsqueeze(0)).softmax(dim=1)[0]  # a batch of one: any export takes it
    best = int(probabilities.argmax())
    print(meta["class_names"][best], f"{float(probabilities[best]):.4f}")
