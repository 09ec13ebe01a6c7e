"""lwcompile: compile any PyTorch model into layer-wise local-loss training (LocoProp).

Example:
    >>> import torch, lwcompile
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    >>> prog = lwcompile.transform(model, torch.nn.functional.mse_loss, torch.randn(16, 4))
    >>> isinstance(prog.step(torch.randn(16, 4), torch.randn(16, 4)), float)
    True
"""
from lwcompile.api import transform
from lwcompile.config import Config
from lwcompile.errors import (ConfigError, DistributedError, ExportError, LossError, LwcompileError, NonFiniteError,
                              PartitionError,
                              TraceError)
from lwcompile.ir import Block
from lwcompile.program import Program
from lwcompile.train import TrainJob
from lwcompile.transfers import register_transfer

__all__ = ["transform", "Config", "Program", "Block", "TrainJob", "LwcompileError", "ConfigError", "TraceError", "PartitionError",
           "NonFiniteError", "LossError", "ExportError", "DistributedError", "register_transfer"]
__version__ = "0.1.0"
