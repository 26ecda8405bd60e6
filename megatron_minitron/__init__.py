"""megatron-minitron: derive smaller LLMs from a large one (prune + distill) on Megatron-Core."""

__version__ = "0.1.0"
