"""Recipe configuration: one frozen dataclass with typed sections (``sections.py``), overridable by
``section.key=value`` (``keys.py``).

Also the tables every wing shares without importing the CLI: :data:`OPTION_KEYS` (which ``kiln train``
flag sets which key) and :data:`LEGACY_KEYS` (keys renamed since older run directories were written).
"""
from __future__ import annotations

from recipes.config.keys import (
                                 LEGACY_KEYS,
                                 OPTION_KEYS,
                                 apply_overrides,
                                 config_docs,
                                 config_from_dict,
                                 config_to_dict,
                                 field_paths,
                                 flatten_config,
                                 hparams,
                                 json_safe,
                                 resolve_key,
                                 with_class_count,
                                 with_max_lr,
)
from recipes.config.sections import (
                                 DATASETS,
                                 FILE_DATASETS,
                                 KILN_MODELS,
                                 SECTIONS,
                                 CheckpointConfig,
                                 Config,
                                 ConfigError,
                                 DataConfig,
                                 DataError,
                                 FinetuneConfig,
                                 GuardConfig,
                                 ModelConfig,
                                 OptimConfig,
                                 ScheduleConfig,
                                 TrackingConfig,
                                 TrainConfig,
                                 parse_size,
)

__all__ = [
    "Config", "CheckpointConfig", "DataConfig", "FinetuneConfig", "GuardConfig", "ModelConfig", "OptimConfig", "ScheduleConfig",
    "TrackingConfig", "TrainConfig", "ConfigError", "DataError", "apply_overrides", "config_docs", "config_to_dict", "config_from_dict",
    "field_paths", "flatten_config", "hparams", "json_safe", "resolve_key", "with_max_lr", "with_class_count",
    "OPTION_KEYS", "LEGACY_KEYS", "DATASETS", "FILE_DATASETS", "KILN_MODELS", "SECTIONS", "parse_size",
]
