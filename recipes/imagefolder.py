"""The imagefolder recipe: any torchvision classification model on a folder of images (train/ and val/ class folders).

Standard ImageNet-style transforms at ``--image-size``, seeded per sample so batches do not depend on
the DataLoader's workers; ``--model NAME`` picks the network and ``--weights PATH`` loads local
initial weights (nothing is downloaded).
"""
from recipes.config import Config, DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig

__all__ = ["CONFIG"]

CONFIG = Config(
    name="imagefolder",
    description="a torchvision model (--model resnet18) on --data-dir DIR with train/ and val/ class folders, 10 epochs",
    data=DataConfig(dataset="imagefolder", batch_size=64, image_size=224, augment="crop+flip", val_fraction=0.2,
                    num_workers=4),
    model=ModelConfig(name="resnet18"),
    optim=OptimConfig(lr=1e-4, weight_decay=0.05),
    schedule=ScheduleConfig(max_lr=1e-3, pct_start=0.25),
    train=TrainConfig(epochs=10, label_smoothing=0.1, clip_norm=1.0),
)
