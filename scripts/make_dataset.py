"""Make D4RL-style datasets for gymnasium v5 MuJoCo and Adroit, and a random AntMaze set, without the network, as
Minari datasets.

  python scripts/make_dataset.py walker2d-random          # -> local/walker2d/random-v0
  python scripts/make_dataset.py hopper-medium            # needs results/policies/hopper-medium.pt
  python scripts/make_dataset.py hopper-medium-replay     # re-runs the seeded SAC run of that policy
  python scripts/make_dataset.py hopper-medium-replay --from-run runs/hopper__sac__0__...  # or reads its buffer
  python scripts/make_dataset.py hopper-medium --steps 5000   # small set: local/hopper/medium-n5000-v0
  python scripts/make_dataset.py antmaze-umaze-random --steps 3000   # AntMaze without the hub

Protocols (D4RL, Fu et al. 2020):
  random         1M steps of a randomly initialised tanh-Gaussian policy, seed 0 (the algorithm
                 files run this script when a *-random set is missing, so the id has one meaning);
                 also for pen and door, which have no random set in D4RL (their human, cloned and
                 expert sets are on the Minari hub only; pen-medium and door-medium follow the
                 medium protocol below with a sac.py policy trained here);
  medium, expert 1M steps of the shipped SAC policy (results/policies/, see manifest.json) with
                 stochastic actions;
  medium-replay  the replay buffer of the seeded SAC run that produced the medium policy, regenerated
                 by running it again with the recorded config and thread count (bit-identical on the
                 same CPU and torch build; the script checks its final actor against the shipped one),
                 or read from that run's final checkpoint when you still have it (--from-run);
  medium-expert  the medium and expert datasets concatenated.
AntMaze (not D4RL's: its sets are the hub's only):
  umaze-random   uniform random actions in Minari's umaze training env, with the dict observations,
                 sparse reward and continuing episodes of Minari's umaze-v1 (no infos); every other
                 episode starts in the goal cell, so that the set holds rewards (an ant moving at
                 random does not reach a goal 8 m away). For trying AntMaze offline (the algorithm
                 files make it when missing), not for results.
Sizes other than the default get their own id (<quality>-n<steps>). The reference scores (D4RL's,
except ant's) are stored in the metadata; the same seed gives the same dataset. Writes are atomic
and locked per id: a second process making the same id waits and reuses it; folders left by a
killed write (.tmp-<pid>) are removed by the next write. Policy rollouts run as 2 fixed shards (so
the data do not depend on --workers), in parallel processes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import tyro
from tqdm import tqdm

NUM_SHARDS = 2
RANDOM_DATASET_SEED = 0  # one random dataset per size, whatever the run's seed
# Spawned rollout workers import this file by name (they inherit sys.path) to find collect_shard;
# the same path entry makes the shared helpers importable when this file is loaded as a module.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, load_algorithm  # noqa: E402

so2 = load_algorithm("so2")
sac = load_algorithm("sac")


@dataclass
class Args:
    name: tyro.conf.Positional[str]
    """Dataset name <env>-<quality>: env in halfcheetah, hopper, walker2d, ant; quality in random,
    medium, medium-replay, medium-expert, expert; {pen,door}-{random,medium}; or antmaze-umaze-random."""
    steps: Optional[int] = None
    """Transitions (default 1M; medium-expert: per half). medium-replay: cap on the SAC run, which
    by default runs until the medium policy's stop score, as the shipped one did (not with
    --from-run)."""
    seed: int = 0
    """Seed of the rollouts (*-random: ignored, so2.py's fixed seed keeps one random dataset per size)."""
    workers: int = 2
    """Processes for policy rollouts (1 or 2; the data are the same either way)."""
    policy_dir: str = str(REPO / "results" / "policies")
    """Folder with the behaviour policies (<env>-<quality>.pt) and manifest.json."""
    from_run: Optional[str] = None
    """medium-replay only: take the replay buffer from this finished sac.py run folder (the run
    that trained the shipped medium policy) instead of re-running it; refused unless its final
    actor is the shipped one."""


def dataset_id(env: str, quality: str, steps: Optional[int]) -> str:
    return f"local/{env}/{quality}-v0" if steps in (None, 1_000_000) else f"local/{env}/{quality}-n{steps}-v0"


def env_dims(env_name: str) -> tuple[int, int]:
    """(observation, action) sizes of the algorithm files' env."""
    env = so2.make_env(env_name)
    env.close()
    return env.observation_space.shape[0], env.action_space.shape[0]


def random_policy(env_name: str, seed: int) -> torch.nn.Module:
    """D4RL 'random' behaviour policy: a randomly initialised tanh-Gaussian policy (so2.py's
    actor, 3x256), the same for every caller so that local/<env>/random-v0 has one meaning."""
    torch.manual_seed(seed)
    return so2.Actor(*env_dims(env_name), (256, 256, 256))


def collect_episodes(env_name: str, policy: torch.nn.Module, steps: int, seed: int, n_envs: int = 16):
    """D4RL protocol: roll out `policy` with stochastic actions (drawn from the global torch RNG,
    which the caller seeds) until `steps` transitions exist, in the algorithm files' env (pen: 100
    steps; door: D4RL's reward). n_envs copies step in lockstep so that one batched policy forward
    serves them all; episodes still running at the budget are cut as truncated."""
    envs = [so2.make_env(env_name) for _ in range(n_envs)]
    keys = ("observations", "actions", "rewards", "terminations", "truncations")
    obs = np.stack([env.reset(seed=seed * 1000 + i)[0] for i, env in enumerate(envs)])
    current = [{"observations": [o], **{k: [] for k in keys[1:]}} for o in obs]
    episodes, collected = [], 0
    progress = tqdm(total=steps, desc=f"generate {envs[0].spec.id}", unit="step", mininterval=2)
    with torch.no_grad():
        while collected < steps:
            actions = policy(torch.as_tensor(obs, dtype=torch.float32))[0].numpy()
            for i, env in enumerate(envs):
                next_obs, reward, terminated, truncated, _ = env.step(actions[i])
                collected += 1
                ep = current[i]
                for key, value in zip(keys, (next_obs, actions[i], reward, terminated, truncated)):
                    ep[key].append(value)
                if terminated or truncated:
                    episodes.append({k: np.asarray(v) for k, v in ep.items()})
                    next_obs = env.reset()[0]
                    current[i] = {"observations": [next_obs], **{k: [] for k in keys[1:]}}
                obs[i] = next_obs
                if collected >= steps:
                    break
            progress.update(min(n_envs, steps - progress.n))
    progress.close()
    # Episodes still running at the budget end there, as time-limit truncations.
    for ep in current:
        if ep["actions"]:
            ep["truncations"][-1] = True
            episodes.append({k: np.asarray(v) for k, v in ep.items()})
    return episodes


# Minari's D4RL/antmaze/umaze-v1 records AntMaze_UMaze-v4 on so2.UMAZE_EVAL's walls, reset and goal
# cells, the episode going on past the goal; its stored evaluation env has these mirrored walls (its
# issue #304).
MINARI_UMAZE_EVAL = [[1, 1, 1, 1, 1], [1, 0, 0, "r", 1], [1, 0, 1, 1, 1], [1, 0, 0, "g", 1], [1, 1, 1, 1, 1]]
UMAZE_GOAL_CELL = np.argwhere(np.array(so2.UMAZE_EVAL, dtype=object) == "g")[0]  # (row, column)


def umaze_env() -> gym.Env:
    import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)
    env = gym.make("AntMaze_UMaze-v4", maze_map=so2.UMAZE_EVAL, continuing_task=True, reset_target=False)
    os.unlink(env.unwrapped.tmp_xml_file_path)  # gymnasium-robotics leaves the compiled maze's file in /tmp
    return env


def umaze_random_episodes(steps: int, seed: int) -> list[dict]:
    """Uniform random actions in Minari's umaze training env (700-step episodes, its time limit;
    dict observations; reward 1 while within 0.45 of the goal). Every other episode starts in the
    goal cell."""
    env, rng, episodes, collected = umaze_env(), np.random.default_rng(seed), [], 0
    while collected < steps:
        options = {"reset_cell": UMAZE_GOAL_CELL} if len(episodes) % 2 == 0 else None
        obs, _ = env.reset(seed=seed * 1000 + len(episodes), options=options)
        path, actions, rewards, truncated = [obs], [], [], False
        while not truncated and collected < steps:
            actions.append(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
            obs, reward, _, truncated, _ = env.step(actions[-1])
            path.append(obs)
            rewards.append(reward)
            collected += 1
        episodes.append(
            {
                "observations": {k: np.stack([o[k] for o in path]) for k in obs},
                "actions": np.stack(actions),
                "rewards": np.array(rewards),
                "terminations": np.zeros(len(rewards), dtype=bool),  # the task continues past the goal
                "truncations": np.arange(len(rewards)) == len(rewards) - 1,  # time limit or budget
            }
        )
    env.close()
    return episodes


def write_minari_dataset(
    dataset_id: str, episodes, base: str, algorithm_name: str, description: str, code: str
) -> None:
    """Write episodes as a real Minari dataset, atomically: build it under a temporary root next to
    the datasets folder and move it into place, so an interrupted write never blocks the id."""
    import minari
    from minari.data_collector import EpisodeBuffer

    root = so2.dataset_path()
    tmp_root = root / f".tmp-{os.getpid()}"
    env = umaze_env() if base == "antmaze" else so2.make_env(base)
    # pen and door: the spec without D4RLAdroit, which Minari could not import when it remakes the env
    # (so Minari's recovered env has gymnasium-robotics' pen ends and door reward; the description says so)
    spec = env.env.spec if isinstance(env, so2.D4RLAdroit) else env.spec
    env.close()
    eval_spec = spec
    if base == "antmaze":  # as Minari stores umaze's evaluation env: mirrored walls (so2.make_env undoes them)
        eval_spec = replace(spec, kwargs=spec.kwargs | {"maze_map": MINARI_UMAZE_EVAL})
    previous, scratch = os.environ.get("MINARI_DATASETS_PATH"), tempfile.mkdtemp()
    try:
        os.environ["MINARI_DATASETS_PATH"] = str(tmp_root)
        tempfile.tempdir = scratch  # Minari makes the specs' envs: AntMaze's leave their maze files there
        buffers = [
            EpisodeBuffer(
                id=i,
                observations=ep["observations"],
                actions=ep["actions"].astype(np.float32),
                rewards=ep["rewards"],
                terminations=ep["terminations"],
                truncations=ep["truncations"],
            )
            for i, ep in enumerate(episodes)
        ]
        low, high = so2.ENVS[base][1]
        minari.create_dataset_from_buffers(
            dataset_id,
            buffers,
            env=spec,
            algorithm_name=algorithm_name,
            author="offline-to-online RL reference implementations",
            author_email="n/a",
            code_permalink=code,
            description=description,
            ref_min_score=low,
            ref_max_score=high,
            eval_env=eval_spec,
        )
    finally:
        tempfile.tempdir = None  # the default again
        shutil.rmtree(scratch, ignore_errors=True)
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
    try:
        target = so2.dataset_path(dataset_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        for level in range(1, len(Path(dataset_id).parts)):  # namespace metadata minari expects
            meta = Path(*Path(dataset_id).parts[:level]) / "namespace_metadata.json"
            if not (root / meta).exists():
                shutil.copy(tmp_root / meta, root / meta)
        os.replace(tmp_root / dataset_id, target)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def remove_stale_writes(root: Path) -> None:
    """Temporary roots (.tmp-<pid>) of writes whose process is gone, e.g. killed mid-write."""
    for tmp in root.glob(".tmp-*"):
        try:
            os.kill(int(tmp.name.removeprefix(".tmp-")), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # a live process of another user
            pass


@contextmanager
def dataset_lock(target: str):
    """Exclusive lock of one dataset id in the datasets folder, held while it is made."""
    root = so2.dataset_path()
    problem = so2.writable_dir_problem(root)
    if problem:
        raise so2.ConfigError(f"cannot write datasets to MINARI_DATASETS_PATH '{root}': {problem}")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".lock-{target.replace('/', '__')}", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process making {target}", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        remove_stale_writes(root)
        yield


def load_policy(policy_dir: str, env: str, quality: str) -> tuple[torch.nn.Module, dict]:
    """The shipped SAC actor and its manifest entry; ConfigError if it is not there."""
    manifest_path = Path(policy_dir) / "manifest.json"
    entry = json.loads(manifest_path.read_text()).get(f"{env}-{quality}", {}) if manifest_path.exists() else {}
    if entry.get("file") is None:
        why = entry.get("status", f"no entry in {manifest_path}")
        raise so2.ConfigError(
            f"no {env}-{quality} behaviour policy ({why}); train one with algorithms/sac.py (see README)"
        )
    hidden = entry["sac_config"]["hidden_dim"]
    actor = sac.Actor(*env_dims(env), (hidden, hidden))
    actor.load_state_dict(torch.load(Path(policy_dir) / entry["file"], map_location="cpu"))
    return actor, entry


def ignore_sigint() -> None:
    """Rollout workers leave Ctrl-C to the main process, which stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def collect_shard(task: tuple) -> list[dict]:
    """One shard of a policy rollout, in its own process."""
    policy_dir, env, quality, steps, seed = task
    torch.set_num_threads(1)
    actor, _ = load_policy(policy_dir, env, quality)
    torch.manual_seed(seed)
    return collect_episodes(env, actor, steps, seed)


def policy_episodes(args: Args, env: str, quality: str, steps: int) -> list[dict]:
    shard_steps = [steps // NUM_SHARDS + (k < steps % NUM_SHARDS) for k in range(NUM_SHARDS)]
    tasks = [(args.policy_dir, env, quality, n, args.seed * NUM_SHARDS + k) for k, n in enumerate(shard_steps) if n > 0]
    if args.workers == 1:
        shards = [collect_shard(t) for t in tasks]
    else:
        with get_context("spawn").Pool(args.workers, initializer=ignore_sigint) as pool:  # exit terminates it
            shards = pool.map(collect_shard, tasks)
    return [ep for shard in shards for ep in shard]


def rows_to_episodes(rows: np.ndarray, obs_dim: int, act_dim: int) -> list[dict]:
    """A SAC replay buffer in insertion order -> episodes. An episode ends at a termination, where
    the next row does not start from this row's next state (a reset), or at the buffer's end."""
    obs, act = rows[:, :obs_dim], rows[:, obs_dim : obs_dim + act_dim]
    rew, next_obs, done = rows[:, obs_dim + act_dim], rows[:, obs_dim + act_dim + 1 : -1], rows[:, -1] > 0
    ends = done.copy()
    ends[:-1] |= np.any(obs[1:] != next_obs[:-1], axis=1)
    ends[-1] = True
    episodes, start = [], 0
    for end in np.flatnonzero(ends):
        sl = slice(start, end + 1)
        episodes.append(
            {
                "observations": np.concatenate([obs[sl], next_obs[end : end + 1]]).astype(np.float64),
                "actions": act[sl],
                "rewards": rew[sl].astype(np.float64),
                "terminations": done[sl],
                "truncations": (np.arange(start, end + 1) == end) & ~done[end],
            }
        )
        start = end + 1
    return episodes


def same_actor(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def buffer_in_insertion_order(buffer: dict) -> np.ndarray:
    """sac.py's buffer state -> rows oldest first (a full buffer has overwritten from row 0 on,
    its oldest row is at ptr; a buffer that is not full has ptr == len(rows), a no-op roll)."""
    return np.roll(buffer["rows"].numpy(), -buffer["ptr"], axis=0)


def replay_episodes(args: Args, env: str) -> tuple[list[dict], str]:
    """The replay buffer of the seeded SAC run behind the medium policy: re-run it, or read it
    from the run's own final checkpoint (--from-run)."""
    actor, entry = load_policy(args.policy_dir, env, "medium")
    shipped = actor.state_dict()
    if args.from_run is not None:
        checkpoint_path = Path(args.from_run) / "checkpoint.pt"
        if not checkpoint_path.exists():
            raise so2.ConfigError(f"--from-run: no {checkpoint_path}")
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if not same_actor(checkpoint["agent"]["actor"], shipped):
            raise so2.ConfigError(f"--from-run: the actor in {checkpoint_path} is not the shipped {env}-medium policy")
        rows, note = (
            buffer_in_insertion_order(checkpoint["loop"]["buffer"]),
            "read from the final checkpoint of that run, whose actor is the shipped medium policy",
        )
    else:
        cfg = sac.Config(**entry["sac_config"])
        with tempfile.TemporaryDirectory() as tmp:
            cfg = replace(
                cfg, out_dir=tmp, track=False, total_steps=min(cfg.total_steps, args.steps or cfg.total_steps)
            )
            torch.set_num_threads(entry["torch_threads"])
            run_dir = sac.train(sac.resolve_config(cfg), None)
            checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
        rows = buffer_in_insertion_order(checkpoint["loop"]["buffer"])
        same = same_actor(checkpoint["agent"]["actor"], shipped)
        note = (
            "regenerated; its final actor equals the shipped medium policy"
            if same
            else "WARNING: regenerated, but its final actor differs from the shipped medium policy (other hardware, threads or --steps)"
        )
    return rows_to_episodes(rows, *env_dims(env)), note


def stored_episodes(dataset: str) -> list[dict]:
    import minari

    return [
        {
            "observations": e.observations,
            "actions": e.actions,
            "rewards": e.rewards,
            "terminations": e.terminations,
            "truncations": e.truncations,
        }
        for e in minari.load_dataset(dataset).iterate_episodes()
    ]


def make(args: Args) -> str:
    """Write the dataset named by args (and, for medium-expert, its missing halves); its id."""
    env, quality = so2.parse_env_name(args.name)
    hub = so2.dataset_ids(env, quality, 1_000_000)[1]
    if hub and env in (*so2.ADROIT, "antmaze"):  # those sets exist on the Minari hub only
        raise so2.ConfigError(f"{args.name} comes from the Minari hub ({hub[0]}), not from this script")
    if args.workers not in (1, 2) or (args.steps is not None and args.steps < 1):
        raise so2.ConfigError("workers must be 1 or 2 and steps >= 1")
    if args.from_run is not None and (quality != "medium-replay" or args.steps is not None):
        raise so2.ConfigError(
            "--from-run is for full-size medium-replay datasets only (no --steps: the run's whole buffer is the dataset)"
        )
    target = dataset_id(env, quality, args.steps)
    with dataset_lock(target):
        if so2.dataset_path(target).exists() and not (so2.dataset_path(target) / "data").exists():
            shutil.rmtree(so2.dataset_path(target))  # a folder without data is no dataset: a leftover
        exists = (so2.dataset_path(target) / "data").exists()
        if exists and quality in so2.GENERATED:  # made by a run or a concurrent process: reuse it
            print_summary(target, env, stored_episodes(target))
            return target
        if exists:
            raise so2.ConfigError(
                f"{target} already exists under {so2.dataset_path()}; delete that folder to make it again"
            )
        episodes, algorithm, description = make_episodes(args, env, quality)
        write_minari_dataset(target, episodes, env, algorithm, description, "scripts/make_dataset.py")
        if env != "antmaze":  # AntMaze's goal steps become terminals when an algorithm file flattens it
            so2.save_flat_cache(target, so2.flatten_episodes(episodes))
    print_summary(target, env, episodes)
    return target


def make_episodes(args: Args, env: str, quality: str) -> tuple[list[dict], str, str]:
    """(episodes, algorithm name, description) of a dataset by its D4RL protocol."""
    steps, (gym_id, _, length) = args.steps or 1_000_000, so2.ENVS[env]
    if env == "antmaze":  # umaze-random
        algorithm = "uniform random actions, every other episode starting at the goal"
        description = f"{steps} steps of {algorithm} in AntMaze_UMaze-v4 (Minari's umaze-v1 training env), seed {RANDOM_DATASET_SEED}; not a D4RL set."
        return umaze_random_episodes(steps, RANDOM_DATASET_SEED), algorithm, description
    gym_id += "" if length is None else f" with D4RL's {length}-step episodes"
    gym_id += " ending when the pen drops, as D4RL's" if env == "pen" else ""
    gym_id += " with D4RL's reward" if env == "door" else ""
    gym_id += " (the algorithm files' D4RLAdroit; not in the recovered env)" if env in so2.ADROIT else ""
    if quality == "random":
        episodes = collect_episodes(env, random_policy(env, RANDOM_DATASET_SEED), steps, RANDOM_DATASET_SEED)
        algorithm = "randomly initialised tanh-Gaussian policy (D4RL random protocol)"
        return episodes, algorithm, f"{steps} steps of a {algorithm} on {gym_id}, seed {RANDOM_DATASET_SEED}."
    if quality in ("medium", "expert"):
        _, entry = load_policy(args.policy_dir, env, quality)
        algorithm = f"SAC {quality} policy {entry['file']} (normalised score {entry['eval_normalized_score']:.1f}), stochastic actions"
        description = f"{steps} steps of {algorithm} on {gym_id}, seed {args.seed} (D4RL {quality} protocol). Policy trained by: {entry['command']}"
        return policy_episodes(args, env, quality, steps), algorithm, description
    if quality == "medium-replay":
        episodes, note = replay_episodes(args, env)
        print(note, file=sys.stderr)
        algorithm = "replay buffer of the seeded SAC run that produced the medium policy"
        return (
            episodes,
            algorithm,
            f"{sum(len(e['rewards']) for e in episodes)} transitions: the {algorithm} on {gym_id} ({note}).",
        )
    halves = []  # medium-expert: both halves, made when missing
    for half in ("medium", "expert"):
        half_id = dataset_id(env, half, args.steps)
        if not (so2.dataset_path(half_id) / "data").exists():
            make(replace(args, name=f"{env}-{half}"))
        halves.append(half_id)
    episodes = stored_episodes(halves[0]) + stored_episodes(halves[1])
    return (
        episodes,
        f"{halves[0]} + {halves[1]}",
        f"D4RL medium-expert protocol: {halves[0]} followed by {halves[1]} on {gym_id}.",
    )


def print_summary(target: str, env: str, episodes: list[dict]) -> None:
    returns = np.array([e["rewards"].sum() for e in episodes], dtype=np.float64)
    steps = sum(len(e["rewards"]) for e in episodes)
    score = (  # an AntMaze return here counts the steps near the goal: no success rate
        f"{int((returns > 0).sum())} episodes with a goal step"
        if env == "antmaze"
        else f"normalised {float(so2.normalized_score(env, returns).mean()):.1f}"
    )
    print(
        f"{target}: {len(returns)} episodes, {steps} steps, mean return {returns.mean():.1f} (std {returns.std():.1f}), {score}"
    )


def interrupt(signum: int, frame) -> None:
    """SIGINT and SIGTERM unwind the script (its temporary files are removed on the way out)."""
    raise KeyboardInterrupt(signum)


def main() -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, interrupt)
    try:
        make(tyro.cli(Args))
    except so2.ConfigError as exc:
        print(f"make_dataset.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        print("make_dataset.py: interrupted; no dataset was written", file=sys.stderr)
        sys.exit(128 + (exc.args[0] if exc.args else signal.SIGINT))


if __name__ == "__main__":
    main()
