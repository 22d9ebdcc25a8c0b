"""`vlmtune plan`: will this recipe fit, per GPU, before anything is launched?

`memory` holds the formulas (parameters, optimizer states, activations, as training lays them out); `fit` adds
them up per GPU for the recipe's sharding, compares with the GPU's memory and names the changes that would fit;
`methods` adds what dpo and grpo need beyond one forward and backward (the pair, the rollouts' KV cache, the
reference pass); `report` writes the plan as a table or JSON.
"""

from vlmtune.plan.fit import Plan, plan_recipe
from vlmtune.plan.memory import Sharding
from vlmtune.plan.report import format_plan, plan_json

__all__ = ["Plan", "Sharding", "format_plan", "plan_json", "plan_recipe"]
