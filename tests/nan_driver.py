"""Run an algorithm file whose critic (the policy in a file without one) becomes NaN after a given
number of calls of an agent method, as a diverging run would:

  python tests/nan_driver.py algorithms/so2.py SO2Agent.finetune_critic_step 30 --env ... (flags)
"""

import importlib.util
import sys
from pathlib import Path

import torch

path, target, calls, *args = sys.argv[1:]
spec = importlib.util.spec_from_file_location(Path(path).stem, path)
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
cls_name, method_name = target.split(".")
cls = getattr(module, cls_name)
method = getattr(cls, method_name)
counts: dict[int, int] = {}


def poisoned(self, *a, **kw):
    """Counted per agent: the start-of-run time estimate calls the same method on a copy."""
    out = method(self, *a, **kw)
    counts[id(self)] = counts.get(id(self), 0) + 1
    if counts[id(self)] == int(calls):
        with torch.no_grad():
            network = self.critic if hasattr(self, "critic") else self.actor
            next(network.parameters()).fill_(float("nan"))
    return out


setattr(cls, method_name, poisoned)
module.main(args)
