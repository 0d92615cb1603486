"""How unit tasks are executed: the descriptor base class and the descriptor registry."""

from .base import TaskExecutionDescriptor
from .registry import descriptor_for, register_descriptor

__all__ = ["TaskExecutionDescriptor", "descriptor_for", "register_descriptor"]
