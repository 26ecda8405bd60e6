from megatron_minitron.model.build import build_model, te_available

__all__ = ["build_model", "te_available"]
