"""Classify images with an ONNX model from `kiln export --format onnx`, using onnxruntime (torchvision: preprocessing).

Usage: python load_onnx_without_kiln.py MODEL_FILE.onnx IMAGE...   (prints CLASS PROBABILITY, one line per image)
"""
import json
import sys

import numpy as np
import onnxruntime
import torchvision.transforms.functional as F
from PIL import Image

model_file, images = sys.argv[1], sys.argv[2:]
session = onnxruntime.InferenceSession(model_file, providers=["CPUExecutionProvider"])
meta = json.loads(session.get_modelmeta().custom_metadata_map["kiln"])
p = meta["preprocessing"]
how = F.InterpolationMode(p.get("interpolation", "bilinear"))  # bicubic for some pretrained weights
for image in images:
    x = F.to_tensor(Image.open(image).convert(p["mode"]))
    if p["resize"] is None:
        x = F.resize(x, [p["size"], p["size"]], interpolation=how, antialias=True)
    else:
        x = F.center_crop(F.resize(x, p["resize"], interpolation=how, antialias=True), p["size"])
    x = F.normalize(x, p["mean"], p["std"])
    logits = session.run(None, {"input": x.unsqueeze(0).numpy()})[0][0]  # a batch of one: any export takes it
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    best = int(probabilities.argmax())
    print(meta["class_names"][best], f"{float(probabilities[best]):.4f}")
