"""Layers, modules and training utilities built on the tinygrad3 engine."""
from .module import Module, ModuleList, Parameter, StateDictError
from .layers import Embedding, Linear, RMSNorm
from .optim import AdamW, StepResult
from .amp import LossScaler
from .schedule import LRSchedule
from .graphed_step import GraphedMicroBatch

__all__ = ["Module", "ModuleList", "Parameter", "StateDictError", "Linear", "Embedding", "RMSNorm",
           "AdamW", "StepResult", "LossScaler", "LRSchedule", "GraphedMicroBatch"]
