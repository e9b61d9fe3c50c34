"""Time every algorithm file's updates at its own defaults, in one run, against SAC's update.

Each algorithm file times its remaining updates at the start of a run (`time_phases`: a few
updates of a copy of the agent on random rows); this script calls exactly that function for every
file with its default config on walker2d sizes (17-dim states, 6-dim actions), in interleaved
rounds, and keeps each method's fastest round. SAC's update (twin 2x256 critics, batch 256) is
the baseline measured in the same rounds, so the ratios hold on a noisy machine. Prints one JSON
line per method and phase:
  {"algo", "phase", "ms_per_step", "per_step", "ratio_to_sac_update", "device", "threads"}

  python scripts/bench_methods.py --rounds 3 --device cpu
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import tyro

from common import load_algorithm

OBS_DIM, ACT_DIM = 17, 6  # walker2d
# What one "step" of each phase is at the file's defaults.
PER_STEP = {
    ("so2", "pretraining"): "1 EDAC update (N=10, batch 256)",
    ("so2", "finetuning"): "env step: 10 critic updates (N=10, batch 2,560) + 1 actor update",
    ("td3_bc", "pretraining"): "1 critic update + 1/2 actor update (policy delay 2)",
    ("td3_bc", "finetuning"): "env step: 1 critic update + 1/2 actor update",
    ("iql", "finetuning"): "env step: 1 update",
    ("awac", "finetuning"): "env step: 1 update",
    ("cal_ql", "finetuning"): "env step: 1 update (CQL term on)",
    ("pex", "finetuning"): "env step: 1 V/Q update + 1 new-policy update (policy set picks the actions)",
    ("off2on", "pretraining"): "1 CQL update of each of the 5 agents (batch 256 each, 10+10+10 CQL actions)",
    ("off2on", "finetuning"): "1 update: 10 critics, mixture policy, temperature, density-ratio network",
    ("odt", "pretraining"): "1 update: 256 segments of 20 steps (60 tokens), 4 layers x 512, LAMB + temperature",
    ("odt", "finetuning"): "1 update, as offline (300 after each online episode)",
    ("rlpd", "online"): "env step: 20 critic updates (N=10, LayerNorm, batch 256) + 1 actor and temperature update",
    ("wsrl", "pretraining"): "1 CQL update: N=10 LayerNorm critics, penalty on 2 of them, 10+10+10 CQL actions",
    (
        "wsrl",
        "finetuning",
    ): "env step: 4 critic updates (N=10, batch 256) + 1 actor and temperature update on 1,024 rows",
}
# odt.py sizes its online update count from the replay's episode lengths: a stand-in of 1,000-step ones.
ODT_REPLAY = SimpleNamespace(trajectories=[torch.zeros(1000, 1)])


@dataclass
class Args:
    rounds: int = 3
    """Interleaved rounds; each method keeps its fastest."""
    device: str = "cpu"
    """Torch device."""
    algos: tuple[str, ...] = ("sac", "so2", "cal_ql", "td3_bc", "iql", "awac", "pex", "off2on", "odt", "rlpd", "wsrl")
    """Algorithm files to time (sac first: it is the baseline)."""


def make_run(name: str, device: torch.device) -> tuple[object, SimpleNamespace]:
    """(module, a stand-in for the file's Run with its default config and a fresh agent)."""
    module = load_algorithm(name)
    if name == "sac":
        cfg = module.Config(env="walker2d")
        agent = module.SACAgent(OBS_DIM, ACT_DIM, cfg, device)
    else:
        cfg = module.resolve_config(module.Config(env="walker2d-medium"))
        stats = (torch.zeros(OBS_DIM), torch.ones(OBS_DIM))
        agent = {
            "so2": lambda: module.SO2Agent(OBS_DIM, ACT_DIM, cfg, device),
            "cal_ql": lambda: module.CalQLAgent(OBS_DIM, ACT_DIM, cfg, device),
            "td3_bc": lambda: module.TD3BCAgent(OBS_DIM, ACT_DIM, cfg, device, stats),
            "iql": lambda: module.IQLAgent(OBS_DIM, ACT_DIM, cfg, device),
            "awac": lambda: module.AWACAgent(OBS_DIM, ACT_DIM, cfg, device, stats),
            "pex": lambda: module.PEXAgent(OBS_DIM, ACT_DIM, cfg, device),
            "off2on": lambda: module.Off2OnAgent(OBS_DIM, ACT_DIM, cfg, device),
            "odt": lambda: module.ODTAgent(OBS_DIM, ACT_DIM, cfg, device),
            "rlpd": lambda: module.RLPDAgent(OBS_DIM, ACT_DIM, cfg, device),
            "wsrl": lambda: module.WSRLAgent(OBS_DIM, ACT_DIM, cfg, device),
        }[name]()
    return module, SimpleNamespace(cfg=cfg, agent=agent, device=device, obs_dim=OBS_DIM, act_dim=ACT_DIM)


def phase_times(name: str, module, run: SimpleNamespace) -> dict[str, float]:
    """Seconds per step of each phase, from the file's own time_phases (phase names without their notes)."""
    if name in ("sac", "rlpd"):  # one phase, online
        parts = module.time_phases(run, 0)
    elif name == "odt":
        parts = module.time_phases(run, "pretrain", 0, ODT_REPLAY)
    else:
        parts = module.time_phases(run, "pretrain", 0)
    return {phase.split(" (")[0]: seconds for phase, _, seconds in parts}


def main(args: Args) -> None:
    device = torch.device(args.device)
    runs = {name: make_run(name, device) for name in args.algos}
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for name, (module, run) in runs.items():
            for phase, seconds in phase_times(name, module, run).items():
                best[name, phase] = min(seconds, best.get((name, phase), float("inf")))
    sac = best.get(("sac", "training"))
    for (name, phase), seconds in best.items():
        line = {
            "algo": name,
            "phase": phase,
            "ms_per_step": round(1000 * seconds, 2),
            "per_step": PER_STEP.get((name, phase), "1 update (batch 256)"),
            "ratio_to_sac_update": None if sac is None else round(seconds / sac, 2),
            "device": str(device),
            "threads": torch.get_num_threads(),
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
