"""`vlmtune plan`: will this recipe fit, per GPU, before anything is launched?

`memory` holds the formulas (parameters, optimizer states, activations, as training lays them out); `fit` adds
them up per GPU for the recipe's sharding, compares with the GPU's memory and names the changes that would fit.
"""

from vlmtune.plan.fit import Plan, format_plan, plan_json, plan_recipe
from vlmtune.plan.memory import Sharding

__all__ = ["Plan", "Sharding", "format_plan", "plan_json", "plan_recipe"]
