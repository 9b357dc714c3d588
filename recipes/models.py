"""The networks kiln's recipes train."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from recipes.timm_models import is_timm, timm_model

__all__ = ["small_cnn", "resnet18_32", "resnet9", "build_model", "parameter_groups", "head_parameters", "load_weights",
           "torchvision_models"]


def small_cnn(in_channels: int = 1, num_classes: int = 10, channels: Sequence[int] = (32, 64, 128),
              image_size: int = 32) -> nn.Sequential:
    """Blocks of conv3x3 (no bias), BatchNorm, ReLU and 2x2 max-pool, then flatten and a linear layer.

    The model of the digits recipe and of kiln's benchmarks (32, 64, 128 channels at 32x32: 4x4x128
    features into the classifier).
    """
    layers: list[nn.Module] = []
    previous = in_channels
    for width in channels:
        layers += [
            nn.Conv2d(previous, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]
        previous = width
    side = image_size // 2 ** len(channels)
    if side < 1:
        raise ValueError(f"{len(channels)} pooling blocks are too many for {image_size}x{image_size} images")
    layers += [nn.Flatten(), nn.Linear(previous * side * side, num_classes)]
    return nn.Sequential(*layers)


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, channels: Sequence[int]) -> nn.Module:
    """The model called ``name``: ``small_cnn``, ``resnet18_32``, ``resnet9``, a torchvision classification model
    or ``timm:NAME`` (the timm extra: :func:`recipes.timm_models.timm_model`).

    (``recipes.config.KILN_MODELS`` lists kiln's own names, so that a config can check a name without
    importing this module; a test keeps the two in step.)

    ``resnet18_32`` and ``resnet9`` ignore ``image_size`` and ``channels``. A torchvision model
    (``resnet18``, ``mobilenet_v3_small``, ``efficientnet_b0``, ``convnext_tiny``, ...; see
    :func:`torchvision_models`) is built with random weights (nothing is downloaded) and
    ``num_classes`` outputs; it takes 3-channel images.
    """
    if name == "small_cnn":
        return small_cnn(in_channels, num_classes, channels, image_size)
    if name == "resnet18_32":
        return resnet18_32(num_classes, in_channels)
    if name == "resnet9":
        return resnet9(num_classes, in_channels)
    if is_timm(name):
        return timm_model(name, in_channels, num_classes, image_size)
    if name in torchvision_models():
        return _torchvision_model(name, in_channels, num_classes, image_size)
    raise ValueError(f"unknown model {name!r}")


def parameter_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool,
                     body_lr_factor: float | None = None) -> list[dict]:
    """AdamW parameter groups: no weight decay on biases and norm weights (1-D tensors) unless asked.

    With ``body_lr_factor`` (fine-tuning), the classifier's parameters (:func:`head_parameters`) come first, in
    groups named ``head``, and the rest in groups named ``body`` with ``lr_scale`` = ``body_lr_factor``: the
    schedule peaks there at that fraction of the head's LR (discriminative LRs).
    """
    head = {id(p) for p in head_parameters(model)} if body_lr_factor is not None else set()
    parts = [("head", [p for p in model.parameters() if id(p) in head], 1.0)] if head else []
    parts.append(("body", [p for p in model.parameters() if id(p) not in head], body_lr_factor or 1.0))
    groups = []
    for name, params, scale in parts:
        decay = [p for p in params if p.requires_grad and (decay_norm_and_bias or p.ndim > 1)]
        no_decay = [p for p in params if p.requires_grad and not (decay_norm_and_bias or p.ndim > 1)]
        tags = {"name": name, "lr_scale": scale} if head else {}
        groups.append({"params": decay, "weight_decay": weight_decay, **tags})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, **tags})
    return groups


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The classifier's parameters (what ``--weights`` replaces when the classes differ): those of the module a
    timm model's ``get_classifier()`` returns, else of the model's last ``nn.Linear``; none if it has neither."""
    head = _head_name(model)
    return list(model.get_submodule(head).parameters()) if head is not None else []


def resnet18_32(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 adapted to 32x32 images (CIFAR): a 3x3 stride-1 stem and no max-pool.

    The ImageNet stem (7x7 stride 2, then a stride-2 max-pool) would shrink a 32x32 image to 8x8
    before the first residual stage; this one keeps 32x32 there, as in the usual CIFAR ResNets.
    """
    from torchvision.models import resnet18  # imported here: only this model needs torchvision

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def torchvision_models() -> list[str]:
    """The names of torchvision's classification models (``resnet18``, ``convnext_tiny``, ...)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    import torchvision

    if in_channels != 3:
        raise ValueError(f"torchvision's {name} takes 3-channel images, and this data has {in_channels}")
    kwargs: dict = {}
    if name in ("inception_v3", "googlenet"):
        kwargs["aux_logits"] = False  # one output: the auxiliary heads only make sense with their own losses
        kwargs["init_weights"] = True
    if name.startswith("vit_"):
        kwargs["image_size"] = image_size  # ViTs are built for one input size
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


class _Scale(nn.Module):
    """Multiply by a constant (ResNet-9's logit scale)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):  # noqa: D102
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    """``x + block(x)``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):  # noqa: D102
        return x + self.block(x)


def resnet9(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """The fast CIFAR ResNet-9 of the DAWNBench / airbench line of work (Myrtle.ai's, by David Page).

    prep conv-bn-relu 64; layer1 conv 128 + 2x2 max-pool + a residual of two conv-bn-relu 128;
    layer2 conv 256 + max-pool; layer3 conv 512 + max-pool + a residual of two conv-bn-relu 512;
    global max pool, a linear layer without bias, and the logits scaled by 1/8. The global pool
    makes it work at any image size of 8 or more (about 6.6M parameters).
    """
    def stage(c_in: int, c_out: int, residual: bool) -> nn.Sequential:
        layers: list[nn.Module] = [*_conv_bn(c_in, c_out), nn.MaxPool2d(2)]
        if residual:
            layers.append(_Residual(nn.Sequential(_conv_bn(c_out, c_out), _conv_bn(c_out, c_out))))
        return nn.Sequential(*layers)

    return nn.Sequential(
        _conv_bn(in_channels, 64),
        stage(64, 128, residual=True),
        stage(128, 256, residual=False),
        stage(256, 512, residual=True),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(512, num_classes, bias=False),
        _Scale(0.125),
    )


def _head_name(model: nn.Module) -> str | None:
    """The name of the model's classifier: what a timm model's ``get_classifier()`` returns (``fc``, ``head.fc``),
    else its last ``nn.Linear`` (``fc``, ``classifier.3``, ``heads.head``, ...)."""
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        classifier = get_classifier()  # a module (Linear, or a 1x1 Conv2d); a pair for distilled ViTs: not one head
        for name, module in model.named_modules():
            if name and module is classifier and next(module.parameters(), None) is not None:
                return name
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return last


def load_weights(model: nn.Module, path: str, name: str | None = None) -> tuple[str, bool]:
    """Load a local weights file into ``model``; returns one line saying what was loaded (of the weights
    ``name``, when they have one) and whether the classifier was left out.

    The file is read with ``torch.load(weights_only=True)`` (no pickled code runs): a state dict,
    e.g. torchvision's ``resnet18-f37072fd.pth``, or a kiln checkpoint (its ``model`` entry); a file
    named ``*.safetensors`` (timm's ``model.safetensors``) with ``safetensors.torch.load_file``. When
    only the classifier differs in shape (another number of classes), everything but the
    classifier is loaded and the line says so.

    Raises:
        ValueError: the file is missing, unreadable, or does not fit the model (one line).
    """
    import os

    if not os.path.isfile(path):
        raise ValueError(f"no weights file at {path}")
    if str(path).endswith(".safetensors"):
        state = _load_safetensors(path)
    else:
        state = _load_torch_file(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise ValueError(f"{path} does not fit this model: keys {', '.join(parts)} (weights of another architecture?)")
    mismatched = [k for k in own if own[k].shape != state[k].shape]
    head = _head_name(model)
    head_keys = {f"{head}.weight", f"{head}.bias"} if head is not None else set()
    if any(k not in head_keys for k in mismatched):
        k = next(k for k in mismatched if k not in head_keys)
        raise ValueError(f"{path} does not fit this model: {k} is {tuple(state[k].shape)} in the file, "
                         f"{tuple(own[k].shape)} here")
    what = f"{name} " if name else ""
    if not mismatched:
        model.load_state_dict(state)
        return f"loaded weights {what}from {path}", False
    model.load_state_dict({k: v for k, v in state.items() if k not in mismatched}, strict=False)
    file_classes = state[f"{head}.weight"].shape[0]
    here = own[f"{head}.weight"].shape[0]
    return (f"loaded weights {what}from {path} except the classifier {head} ({file_classes} classes in the file, "
            f"{here} here: it starts from random weights)", True)


def _load_torch_file(path: str) -> dict:
    """The state dict in a file torch.save wrote (a kiln checkpoint's ``model``), read with ``weights_only``."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, not torch's format, or holding pickled objects: all refused
        import pickle

        if isinstance(e, pickle.UnpicklingError) and ("GLOBAL" in str(e) or "Unsupported global" in str(e)):
            raise ValueError(f"{path} holds pickled Python objects; refused without running them") from None
        raise ValueError(f"{path} is not a weights file torch.save wrote ({type(e).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "kiln" in state:
        state = state["model"]  # a kiln checkpoint
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def _load_safetensors(path: str) -> dict:
    """The tensors in a safetensors file (no code runs: the format holds only tensors)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ValueError(f"{path} is a safetensors file: reading it needs safetensors "
                         "(pip install 'kiln[timm]')") from None
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # truncated, a bad header, not safetensors at all
        raise ValueError(f"{path} is not a safetensors file ({type(e).__name__})") from None
