from megatron_minitron.prune.plan import PrunePlan, PruneTarget, check_scores, make_plan
from megatron_minitron.prune.run import prune_model

__all__ = ["PrunePlan", "PruneTarget", "check_scores", "make_plan", "prune_model"]
