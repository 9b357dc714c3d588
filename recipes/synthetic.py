"""The synthetic recipe: random class-patterned tensors, for smoke tests and benchmarks."""
from recipes.config import Config, DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig

__all__ = ["CONFIG"]

CONFIG = Config(
    name="synthetic",
    description="small CNN on random class-patterned 3x32x32 tensors made at start-up; for smoke tests",
    data=DataConfig(dataset="synthetic", batch_size=64, val_fraction=0.2, image_size=32, samples=1024, num_classes=10),
    model=ModelConfig(name="small_cnn", channels=(16, 32, 64)),
    optim=OptimConfig(lr=1e-3, weight_decay=1e-2),
    schedule=ScheduleConfig(max_lr=1e-2),
    train=TrainConfig(epochs=2, label_smoothing=0.0, clip_norm=1.0),
)
