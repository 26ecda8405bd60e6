from megatron_minitron.importance.run import ImportanceConfig, compute_importance
from megatron_minitron.importance.scores import Scores, load_scores

__all__ = ["ImportanceConfig", "Scores", "compute_importance", "load_scores"]
