from megatron_minitron.model.build import build_model, te_available
from megatron_minitron.model.load import load_chunks, load_model

__all__ = ["build_model", "load_chunks", "load_model", "te_available"]
