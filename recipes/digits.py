"""The digits recipe: a small CNN on scikit-learn's bundled 8x8 digits, upsampled to 32x32."""
from recipes.config import Config, DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig

__all__ = ["CONFIG"]

CONFIG = Config(
    name="digits",
    description="small CNN on scikit-learn's bundled 8x8 digits (1797 images, no download), 10 epochs",
    data=DataConfig(dataset="digits", batch_size=64, val_fraction=0.2, image_size=32),
    model=ModelConfig(name="small_cnn", channels=(32, 64, 128)),
    optim=OptimConfig(lr=1e-3, weight_decay=1e-2),
    schedule=ScheduleConfig(max_lr=1e-2),
    train=TrainConfig(epochs=10, label_smoothing=0.1, clip_norm=1.0),
)
