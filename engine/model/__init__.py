"""The LGRT network (FastAvatar's Large Gaussian Reconstruction Transformer) and its configs."""
from __future__ import annotations

from engine.model.config import CONFIGS, MICRO, OFFICIAL, PAPER, TINY, ModelConfig, get_config
from engine.model.gs_head import GaussianHeadOutput
from engine.model.lgrt import LGRT, build_model

__all__ = ["CONFIGS", "MICRO", "OFFICIAL", "PAPER", "TINY", "ModelConfig", "get_config", "GaussianHeadOutput",
           "LGRT", "build_model"]
