"""Evaluate a shipped behaviour policy against the score band documented in its manifest.

  python scripts/eval_policy.py hopper-medium --episodes 10

Runs the deterministic policy (tanh of the mean) for --episodes episodes from held-out seeded
start states (not the ones training evaluated on), all episodes batched into one policy forward
per step, and prints one JSON line: mean return and episode length, normalised score (and its
spread over the episodes), the band and whether the score lies inside it. Exit code 1 when it does not.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_dataset  # noqa: E402  (the policy loader and the algorithm modules)


@dataclass
class Args:
    name: tyro.conf.Positional[str]
    """Policy name <env>-<quality>, e.g. hopper-medium (an entry of manifest.json)."""
    episodes: int = 10
    """Evaluation episodes."""
    seed: int = 10_000
    """First start-state seed (episode i uses seed + i)."""
    policy_dir: str = str(make_dataset.REPO / "results" / "policies")
    """Folder with the policies and manifest.json."""


@torch.no_grad()
def evaluate(args: Args) -> dict:
    env_name, quality = make_dataset.so2.parse_env_name(args.name)
    actor, entry = make_dataset.load_policy(args.policy_dir, env_name, quality)
    envs = [make_dataset.so2.make_env(env_name) for _ in range(args.episodes)]
    obs = np.stack([env.reset(seed=args.seed + i)[0] for i, env in enumerate(envs)]).astype(np.float32)
    returns, lengths, active = np.zeros(args.episodes), np.zeros(args.episodes), list(range(args.episodes))
    while active:
        actions = actor(torch.as_tensor(obs[active]), deterministic=True)[0].numpy()
        still = []
        for i, action in zip(active, actions):
            obs[i], reward, terminated, truncated, _ = envs[i].step(action)
            returns[i] += reward
            lengths[i] += 1
            if not (terminated or truncated):
                still.append(i)
        active = still
    scores = make_dataset.so2.normalized_score(env_name, returns)
    score = float(scores.mean())
    low, high = entry["score_band"]
    return {
        "policy": args.name,
        "episodes": args.episodes,
        "seed": args.seed,
        "return": round(float(returns.mean()), 1),
        "return_std": round(float(returns.std()), 1),
        "episode_length": round(float(lengths.mean()), 1),  # full-length with a flat return: standing still
        "normalized_score": round(score, 1),
        "episode_score_std": round(float(scores.std()), 1),
        "episode_score_min": round(float(scores.min()), 1),
        "band": [low, high],
        "in_band": low <= score <= high,
    }


def main() -> None:
    try:
        result = evaluate(tyro.cli(Args))
    except make_dataset.so2.ConfigError as exc:
        print(f"eval_policy.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))
    sys.exit(0 if result["in_band"] else 1)


if __name__ == "__main__":
    main()
