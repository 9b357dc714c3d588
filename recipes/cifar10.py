"""The cifar10 recipe: the fast ResNet-9 (DAWNBench / airbench family) on CIFAR-10, held in memory on the device.

Batched on-device augmentation (random crop with 4-pixel padding, horizontal flip), label smoothing,
AdamW with a one-cycle schedule, bf16 on GPUs (``train.precision`` auto). Data: torchvision's
CIFAR-10 format under ``--data-dir`` (``DIR/cifar-10-batches-py/``); ``--download`` fetches it.
"""
from recipes.config import Config, DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig

__all__ = ["CONFIG"]

CONFIG = Config(
    name="cifar10",
    description="ResNet-9 on CIFAR-10 (--data-dir DIR, torchvision's format; --download), crop+flip on device, 18 epochs",
    data=DataConfig(dataset="cifar10", batch_size=512, image_size=32, augment="crop+flip", data_dir="data"),
    model=ModelConfig(name="resnet9"),
    optim=OptimConfig(lr=4e-4, weight_decay=0.1),
    schedule=ScheduleConfig(max_lr=4e-3, pct_start=0.25, final_div_factor=100.0, anneal_strategy="linear"),
    train=TrainConfig(epochs=18, label_smoothing=0.2, clip_norm=0.0, precision="auto"),
)
