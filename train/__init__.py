"""Reference distillation trainer for ttm_kernels: ``python -m train --config FILE [key=value ...]``."""
from .config import load as load_config
from .engine import train

__all__ = ["load_config", "train"]
