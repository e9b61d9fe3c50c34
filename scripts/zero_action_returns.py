"""The return of the zero-action policy per env: a reference beside the scores, for telling a policy
that learned something from one that only survives (or stands still).

  python scripts/zero_action_returns.py                            # halfcheetah, hopper, walker2d, ant, pen, door; 10 episodes
  python scripts/zero_action_returns.py --envs hopper --episodes 50
  python scripts/zero_action_returns.py --envs pen --episodes 50 --seed 1   # the starts of a --seed 1 run

Each episode starts from the evaluation's fixed start states (seeds 1000 k + 500, 1000 k + 501, ...,
as the algorithm files' Evaluator of a run with --seed k) and applies the action 0 until termination
or the time limit. Prints a markdown table: mean return ± std, mean episode length, and the
normalised score of that mean (the algorithm files' reference returns: D4RL's, except ant's).
"""

import sys
from dataclasses import dataclass

import numpy as np
import tyro

from common import load_algorithm


@dataclass
class Args:
    envs: tuple[str, ...] = ("halfcheetah", "hopper", "walker2d", "ant", "pen", "door")
    """Env names of the algorithm files (gymnasium v5 MuJoCo; pen and door as D4RL defines them)."""
    episodes: int = 10
    """Episodes per env."""
    seed: int = 0
    """The run seed whose evaluation start states the episodes use."""


def zero_action_episode(env, seed: int) -> tuple[float, int]:
    """(return, length) of one episode of the action 0 from the start state of `seed`."""
    env.reset(seed=seed)
    total, steps, done = 0.0, 0, False
    while not done:
        _, reward, terminated, truncated, _ = env.step(np.zeros(env.action_space.shape))
        total, steps, done = total + reward, steps + 1, terminated or truncated
    return total, steps


def main(args: Args) -> int:
    so2 = load_algorithm("so2")
    known = [e for e in so2.ENVS if e != "antmaze"]  # AntMaze's env comes from a dataset
    unknown = [e for e in args.envs if e not in known]
    if unknown or args.episodes < 1:
        problem = f"unknown env {unknown[0]}" if unknown else "episodes must be >= 1"
        print(f"zero_action_returns.py: error: {problem}; envs: {', '.join(known)}", file=sys.stderr)
        return 2
    print("| env | gym id | episodes | zero-action return | episode length | normalised |")
    print("|---|---|---|---|---|---|")
    for name in args.envs:
        env = so2.make_env(name)
        returns, lengths = np.array(
            [zero_action_episode(env, 1000 * args.seed + 500 + i) for i in range(args.episodes)]
        ).T
        score = float(so2.normalized_score(name, returns.mean()))
        print(
            f"| {name} | {so2.ENVS[name][0]} | {args.episodes} | {returns.mean():,.1f} ± {returns.std():,.1f} "
            f"| {lengths.mean():,.1f} | {score:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
