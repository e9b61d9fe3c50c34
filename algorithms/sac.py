"""SAC from scratch: the SO2 paper's online baseline, and the trainer of behaviour policies.

Paper: Haarnoja et al., "Soft Actor-Critic Algorithms and Applications" (arXiv 1812.05905):
tanh-Gaussian actor, twin Q critics with a clipped double-Q soft target, automatic temperature
toward entropy -|A|, one gradient step per env step after a uniform-random warm-up. Used here as
(1) the "SAC from scratch" comparison of the SO2 paper (its Fig. 7, e.g. HalfCheetah), and
(2) the trainer of the behaviour policies behind the D4RL-style datasets of
scripts/make_dataset.py (`--stop-score` ends training at a target deterministic score).

Deliberate differences from the paper and common implementations:
  - networks are 2x256 ReLU (as in the paper and CleanRL); actor init and log-std clip [-5, 2]
    follow the other files of this project (EDAC), so one Actor class serves everywhere. The
    critics keep nn.Linear's default init (unlike the EDAC init of so2.py / cal_ql.py): the
    shipped behaviour policies were trained with it, and make_dataset.py re-runs their training.
  - evaluation is batched (all episodes together, fixed seeded start states) and reports the
    same Q diagnostics as algorithms/so2.py (the paper uses online SAC as its Q reference).
  - the run folder (checkpoint.pt with the whole training state, --resume, signals, divergence)
    is the same in every algorithm file; a resumed run ends in the same state as an
    uninterrupted one (on CPU: bit for bit).
  - --critic-lr 1e-3 --alpha-lr 1e-3 --policy-frequency 2 is CleanRL's sac_continuous_action.py
    configuration (compared in results/sac_learning_cpu); two details of it are not reproduced: its
    temperature loss is in alpha rather than log alpha, and takes a fresh log-prob after each actor step.
  - gymnasium 1.x semantics: done = terminated; a time-limit truncation bootstraps from the real
    final observation, which env.step returns before the manual reset.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import itertools
import json
import math
import os
import platform
import re
import signal
import sys
import time
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, Optional

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import tyro
import yaml
from tqdm import tqdm

ALGO = "sac"
FIRST_RESULT = "For a first result on a CPU, shrink the budget, e.g. --total-steps 100000 (see results/README.md for SAC curves here)"


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclass
class Config:
    env: str = "halfcheetah"
    """Environment: halfcheetah, hopper, walker2d, ant (gymnasium v5 MuJoCo), pen or door (Adroit)."""
    config: Optional[str] = None
    """YAML file of field values; flags given on the command line override it."""
    resume: Optional[str] = None
    """Run folder to continue from its checkpoint.pt; its saved config is the default and flags
    override it (e.g. a larger --total-steps continues a finished run; not env, seed or sizes)."""
    seed: int = 0
    """Seed of torch, numpy and the environments; same seed on CPU gives identical runs."""
    device: str = "auto"
    """Torch device: 'auto' picks cuda when available, else cpu."""
    total_steps: int = 1_000_000
    """Env steps (one critic update per env step after learning_starts)."""
    learning_starts: int = 5_000
    """Env steps of uniform random actions before the first update."""
    buffer_size: int = 1_000_000
    """Replay capacity (FIFO beyond it)."""
    batch_size: int = 256
    """Mini-batch size."""
    hidden_dim: int = 256
    """Width of the 2 hidden layers of actor and critics."""
    gamma: float = 0.99
    """Discount factor."""
    tau: float = 5e-3
    """Polyak rate of the target critics."""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor."""
    critic_lr: float = 3e-4
    """Adam learning rate of the critics."""
    alpha_lr: float = 3e-4
    """Adam learning rate of the temperature (CleanRL's SAC uses its critic rate, 1e-3)."""
    policy_frequency: int = 1
    """Actor and temperature are updated after every policy_frequency-th critic update, that many
    times in a row on its batch (CleanRL's delayed update, 2 there); 1 = the SAC paper."""
    eval_every: int = 10_000
    """Evaluate every this many env steps (and at the end)."""
    eval_episodes: int = 10
    """Evaluation episodes, run together with one batched policy forward per step."""
    stop_score: Optional[float] = None
    """Stop once an evaluation's normalised score reaches this (e.g. a 'medium' policy)."""
    kendall_windows: int = 10
    """M: each evaluation episode is cut into M consecutive windows for Kendall's tau."""
    mc_tail_steps: int = 460
    """Q diagnostics skip the last steps of a time-limit-truncated evaluation episode, whose
    Monte-Carlo return misses the cut-off tail (0.99^460 < 1%)."""
    checkpoint_every: int = 50_000
    """Write checkpoint.pt every this many env steps, besides the end and a SIGINT / SIGTERM."""
    out_dir: str = "runs"
    """Runs are written to <out_dir>/<env>__sac[-<run_name>]__<seed>__<unix time>/."""
    run_name: Optional[str] = None
    """Name added to the run folder to tell variants apart (letters, digits, '.', '-')."""
    track: bool = False
    """Log to Weights & Biases (works with WANDB_MODE=offline)."""
    wandb_project: str = "offline-to-online"
    """W&B project name (runs are grouped by algorithm)."""


# Fields a resumed run cannot change: they define the environment, networks, optimisers or evaluation.
RESUME_FIXED = (
    "env", "seed", "hidden_dim", "buffer_size", "eval_episodes", "actor_lr", "critic_lr", "alpha_lr",
    "policy_frequency", "batch_size",
)  # fmt: skip
# The step budget of each phase: a resumed run cannot be given fewer steps than it has made.
PHASE_BUDGET = {"online": "total_steps"}


def resolve_config(cfg: Config) -> Config:
    """Check every value; ConfigError if bad."""
    online = [base for base in ENVS if base != "antmaze"]  # AntMaze's env comes from its dataset
    check([(cfg.env in online, f"unknown env '{cfg.env}'; expected one of {', '.join(online)}")])
    check_common(cfg)
    check(
        [
            (cfg.total_steps >= 1, "total_steps must be >= 1"),
            (cfg.learning_starts >= 0, "learning_starts must be >= 0"),
            (
                1 <= cfg.buffer_size <= 100_000_000 and 1 <= cfg.batch_size <= 1_000_000,
                "buffer_size must be in [1, 1e8] and batch_size in [1, 1000000]",
            ),
            (1 <= cfg.hidden_dim <= 65536, "hidden_dim must be in [1, 65536]"),
            (0 < cfg.gamma <= 1 and 0 < cfg.tau <= 1, "gamma and tau must be in (0, 1]"),
            (
                all(0 < lr <= 1 for lr in (cfg.actor_lr, cfg.critic_lr, cfg.alpha_lr)),
                "learning rates must be in (0, 1]",
            ),
            (1 <= cfg.policy_frequency <= 1000, "policy_frequency must be in [1, 1000]"),
        ]
    )
    return cfg


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
class Actor(nn.Module):
    """Tanh-Gaussian policy, ReLU trunk of the given widths; log-std = head + log_std_offset,
    clipped to [log_std_min, 2] (EDAC: [-5, 2]). Hidden biases 0.1, heads U(-1e-3, 1e-3)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], log_std_offset: float = 0.0):
        super().__init__()
        layers, fan_in = [], obs_dim
        for width in hidden_dims:
            layers += [nn.Linear(fan_in, width), nn.ReLU()]
            fan_in = width
        self.trunk = nn.Sequential(*layers)
        self.mu = nn.Linear(fan_in, act_dim)
        self.log_std = nn.Linear(fan_in, act_dim)
        self.log_std_offset, self.log_std_min = log_std_offset, -5.0
        for layer in self.trunk[::2]:
            nn.init.constant_(layer.bias, 0.1)
        for head in (self.mu, self.log_std):
            nn.init.uniform_(head.weight, -1e-3, 1e-3)
            nn.init.uniform_(head.bias, -1e-3, 1e-3)

    def forward(self, obs: torch.Tensor, deterministic: bool = False):
        """(action in [-1, 1], log pi(action | obs)); log-prob is None when deterministic."""
        h = self.trunk(obs)
        mu = self.mu(h)
        if deterministic:
            return torch.tanh(mu), None
        log_std = (self.log_std(h) + self.log_std_offset).clamp(self.log_std_min, 2.0)
        u = mu + log_std.exp() * torch.randn_like(mu)
        # log N(u; mu, std) - log|d tanh(u)/du|, with log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)).
        log_prob = (-0.5 * ((u - mu) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2 * (math.log(2) - u - nn.functional.softplus(-2 * u))).sum(-1)
        return torch.tanh(u), log_prob


class VectorizedCritic(nn.Module):
    """Twin Q-networks (2x256 ReLU on concat(s, a)) as one [2, in, out] weight per layer,
    evaluated with one batched matmul per layer."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, num_critics: int = 2):
        super().__init__()
        sizes = [obs_dim + act_dim, hidden, hidden, 1]
        self.num_critics = num_critics
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1 / math.sqrt(fan_in)  # nn.Linear's default, per member
            self.weights.append(nn.Parameter(torch.empty(num_critics, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_critics, 1, fan_out).uniform_(-bound, bound)))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """obs [B, S], action [B, A] -> Q [2, B]."""
        x = torch.cat([obs, action], dim=-1).expand(self.num_critics, -1, -1)  # a view: no copy
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            x = torch.relu(torch.baddbmm(b, x, w))
        return torch.baddbmm(self.biases[-1], x, self.weights[-1]).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Losses and updates: the SAC learning rule (clipped double-Q soft target, auto temperature)
# ----------------------------------------------------------------------------------------------
def td_target(reward, done, next_q, next_log_prob, alpha, gamma: float, target: str) -> torch.Tensor:
    """Soft TD target from target-network values next_q [N, B]: per member, y_i = r + gamma (1 - d)
    (Q_i(s', a~') - alpha log pi(a'|s')) -> [N, B]; or with target='min' the min over members
    -> [B] (EDAC / SAC-N). The entropy term uses the log-prob of the unperturbed next action."""
    if target == "min":
        next_q = next_q.min(0).values
    return reward + gamma * (1.0 - done) * (next_q - alpha * next_log_prob)


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


class SACAgent:
    """Actor, twin critics, targets, temperature and their optimisers."""

    def __init__(self, obs_dim: int, act_dim: int, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.actor = Actor(obs_dim, act_dim, (cfg.hidden_dim, cfg.hidden_dim)).to(device)
        self.critic = VectorizedCritic(obs_dim, act_dim, cfg.hidden_dim).to(device)
        self.target_critic = VectorizedCritic(obs_dim, act_dim, cfg.hidden_dim).to(device)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_critic.requires_grad_(False)
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)
        self.target_entropy = -float(act_dim)
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.alpha_optim = torch.optim.Adam([self.log_alpha], lr=cfg.alpha_lr)
        self.updates = 0  # critic updates so far: the delayed actor update counts them

    def state_dict(self) -> dict:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "target_critic": self.target_critic.state_dict(),
            "log_alpha": self.log_alpha.detach().cpu(),
            "actor_optim": self.actor_optim.state_dict(),
            "critic_optim": self.critic_optim.state_dict(),
            "alpha_optim": self.alpha_optim.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("actor", "critic", "target_critic", "actor_optim", "critic_optim", "alpha_optim"):
            getattr(self, name).load_state_dict(state[name])
        self.updates = state.get("updates", 0)  # absent in checkpoints from before the delay: all had 1
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])

    def update(self, batch: torch.Tensor, split) -> dict[str, torch.Tensor]:
        """One SAC step: critics, then (every policy_frequency-th step, that many times) actor and
        temperature, then targets. Returns the losses of the networks it updated (and the temperature
        of the last actor step)."""
        obs, act, rew, next_obs, done = split(batch)
        alpha = self.log_alpha.detach().exp()
        with torch.no_grad():
            next_action, next_log_prob = self.actor(next_obs)
            y = td_target(
                rew, done, self.target_critic(next_obs, next_action), next_log_prob, alpha, self.cfg.gamma, "min"
            )
        critic_loss = (self.critic(obs, act) - y).pow(2).mean(1).sum()
        self.critic_optim.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optim.step()
        losses = {"critic_loss": critic_loss.detach()}
        self.updates += 1
        if self.updates % self.cfg.policy_frequency == 0:
            for _ in range(self.cfg.policy_frequency):
                alpha = self.log_alpha.detach().exp()
                action, log_prob = self.actor(obs)
                actor_loss = (alpha * log_prob - self.critic(obs, action).min(0).values).mean()
                self.actor_optim.zero_grad(set_to_none=True)
                actor_loss.backward(inputs=list(self.actor.parameters()))  # critic weights get no gradient
                self.actor_optim.step()

                alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
                self.alpha_optim.zero_grad(set_to_none=True)
                alpha_loss.backward()
                self.alpha_optim.step()
            losses.update(actor_loss=actor_loss.detach(), alpha=alpha)
        soft_update(self.target_critic, self.critic, self.cfg.tau)
        return losses


# ----------------------------------------------------------------------------------------------
# Train loop
# ----------------------------------------------------------------------------------------------
def online(run: Run, step: int, loop: Optional[dict]) -> bool:
    """Env steps step+1 .. total_steps, one update each after learning_starts; loop (None at the
    start) holds the replay buffer, the running episode and the last losses. True if an
    evaluation reached stop_score."""
    cfg, agent, device = run.cfg, run.agent, run.device
    buffer = ReplayBuffer(cfg.buffer_size, run.obs_dim, run.act_dim, device)
    env = make_env(cfg.env)
    obs, _ = env.reset(seed=cfg.seed)
    losses = {}
    if loop is not None:
        if loop["stopped"]:  # it reached stop_score: nothing more to train
            return True
        buffer.load_state_dict(loop["buffer"])
        restore_env_state(env, loop["env"])
        obs, losses = loop["obs"], loop["losses"]
    # Host staging row for the policy input: filled in place each env step, no new tensor.
    obs_stage = torch.zeros(run.obs_dim, pin_memory=device.type == "cuda")
    stopped = False
    progress = tqdm(
        range(step + 1, cfg.total_steps + 1),
        desc=f"SAC {cfg.env}",
        unit="step",
        mininterval=1,
        initial=step,
        total=cfg.total_steps,
    )
    for step in progress:
        with torch.no_grad():
            if step <= cfg.learning_starts:
                action = (torch.rand(run.act_dim) * 2 - 1).numpy()
            else:
                obs_stage.numpy()[:] = obs
                action = agent.actor(obs_stage.to(device)[None])[0][0].cpu().numpy()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        # done = termination only; a time-limit truncation still bootstraps from next_obs.
        buffer.add(obs, action, reward, next_obs, float(terminated))
        obs = env.reset()[0] if terminated or truncated else next_obs
        if step > cfg.learning_starts:
            # A delayed actor update leaves the last actor loss and temperature as they were.
            losses = {**losses, **agent.update(buffer.sample((cfg.batch_size,)), buffer.split)}
            run.watch(losses)
        if step % cfg.eval_every == 0 or step == cfg.total_steps:
            run.check("online", step)
            record = {
                "phase": "online",
                "step": step,
                "env_steps": step,
                **run.evaluate(agent),
                **{k: float(v) for k, v in losses.items()},
            }
            run.write(record)
            progress.set_postfix(score=f"{record['normalized_score']:.1f}")
            stopped = cfg.stop_score is not None and record["normalized_score"] >= cfg.stop_score
        if run.stop.signum is not None or stopped or step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
            loop = {
                "buffer": buffer.state_dict(),
                "env": env_state(env),
                "obs": obs,
                "losses": losses,
                "stopped": stopped,
            }
            run.save("checkpoint", "online", step, loop)
        if run.stop.signum is not None:
            raise Stopped
        if stopped:
            break
    progress.close()
    return stopped


def time_phases(run: Run, step: int) -> list[tuple[str, int, float]]:
    """(phase, steps left, seconds per step) of the rest of the run, from updates timed on a copy of
    the agent with random rows."""
    cfg, agent = run.cfg, copy.deepcopy(run.agent)
    fixed = torch.Generator(run.device).manual_seed(0)  # the rows must not draw from the run's RNG
    split = ReplayBuffer(1, run.obs_dim, run.act_dim, run.device).split
    rows = torch.rand(cfg.batch_size, 2 * run.obs_dim + run.act_dim + 2, device=run.device, generator=fixed)
    left = cfg.total_steps - max(step, cfg.learning_starts)
    k = cfg.policy_frequency  # whole rounds of the delayed update: k critic steps and k actor steps
    per_step = seconds_per_call(lambda: [agent.update(rows, split) for _ in range(k)], run.device, 3) / k
    return [("training", left, per_step)] if left > 0 else []


def train(cfg: Config, checkpoint: Optional[dict]) -> Path:
    """A new run (checkpoint None) or the continuation of a checkpointed one, to its end."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    evaluate = Evaluator(cfg.env, [make_env(cfg.env) for _ in range(cfg.eval_episodes)], cfg, device)
    obs_dim, act_dim = evaluate.envs[0].observation_space.shape[0], evaluate.envs[0].action_space.shape[0]
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    agent = SACAgent(obs_dim, act_dim, cfg, device)
    with open_run(cfg, checkpoint, agent, evaluate, device, None, ("online", None)) as (run, _, step, loop):
        print(f"run {run.dir}: {ENVS[cfg.env][0]}, device {device}, online from step {step}", file=sys.stderr)
        announce_time(time_phases(run, step))
        online(run, step, loop)
        run.save("final")
    return run.dir


def main(argv: Optional[list[str]] = None) -> None:
    try:
        cfg, checkpoint = parse_args(sys.argv[1:] if argv is None else argv)
        run_dir = train(resolve_config(cfg), checkpoint)
    except ConfigError as exc:
        fail(str(exc))
    except KeyboardInterrupt:  # before the run folder exists, or a second Ctrl-C
        print(f"{ALGO}.py: interrupted (a run folder keeps its last checkpoint)", file=sys.stderr)
        sys.exit(130)
    print(f"done: {run_dir}", file=sys.stderr)


# ==============================================================================================
# Shared plumbing: each definition below is identical in every algorithm file that has it
# (tests/test_shared_blocks.py), so a reader of the method can stop here. Config parsing and checks,
# environments and scores, datasets, replay buffer, evaluation and Q diagnostics, run folder.
# ==============================================================================================
# ----------------------------------------------------------------------------------------------
# Config parsing and checks
# ----------------------------------------------------------------------------------------------
CHECKPOINT_FORMAT = 2  # of checkpoint.pt, pretrain.pt and final.pt


class ConfigError(Exception):
    """Bad input: reported as one line on stderr, exit code 2, before any compute or run folder."""


def fail(message: str) -> None:
    print(f"{ALGO}.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def type_problem(value, hint) -> bool:
    """True if value does not fit the type hint (int, float, bool, str, Optional, Literal, tuple);
    floats must be finite."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return all(type_problem(value, arg) for arg in args)
    if origin is Literal:
        return value not in args
    if origin is tuple:
        return not isinstance(value, tuple) or any(type_problem(v, args[0]) for v in value)
    if hint is type(None):
        return value is not None
    if hint is float:
        return isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if hint is int:
        return isinstance(value, bool) or not isinstance(value, int)
    return not isinstance(value, hint)


def check_types(cfg: Config, source: str) -> None:
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        value, hint = getattr(cfg, f.name), hints[f.name]
        if type_problem(value, hint):
            expected = {float: "a finite float", int: "int", str: "str", bool: "bool"}.get(
                hint, str(hint).replace("typing.", "")
            )
            raise ConfigError(f"{source}{f.name} must be {expected}, got {value!r}")


def check(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def writable_dir_problem(path: Path) -> Optional[str]:
    """Why files cannot be created under path (a file in the way, no write permission), or None."""
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        return f"'{path}' is a file, not a folder"
    return None if os.access(path, os.W_OK | os.X_OK) else f"'{path}' is not writable"


def check_common(cfg: Config) -> None:
    """Types (from the --config file too), finite numbers, seed, evaluation, paths and device."""
    check_types(cfg, "")
    check(
        [
            (0 <= cfg.seed < 2**31, "seed must be in [0, 2^31)"),
            (1 <= cfg.eval_episodes <= 1000, "eval_episodes must be in [1, 1000]"),
            (cfg.eval_every >= 1 and cfg.checkpoint_every >= 1, "eval_every and checkpoint_every must be >= 1"),
            (  # odt.py has no Q diagnostics, so no such fields
                not hasattr(cfg, "kendall_windows") or (1 <= cfg.kendall_windows <= 10_000 and cfg.mc_tail_steps >= 0),
                "kendall_windows must be in [1, 10000] and mc_tail_steps >= 0",
            ),
            (
                cfg.run_name is None or (re.fullmatch(r"[\w.-]+", cfg.run_name) and "__" not in cfg.run_name),
                "run_name may hold letters, digits, '.', '-' and single '_' only",
            ),
        ]
    )
    problem = writable_dir_problem(Path(cfg.out_dir))
    if problem:
        raise ConfigError(f"out_dir '{cfg.out_dir}' cannot hold run folders: {problem}")
    if cfg.device != "auto":
        try:
            if torch.device(cfg.device).type not in ("cpu", "cuda"):
                raise RuntimeError("expected cpu or cuda")
            torch.empty(0, device=cfg.device)
        except (RuntimeError, AssertionError) as exc:
            raise ConfigError(f"device '{cfg.device}' is not usable: {first_line(exc)}")


def read_saved(path: Path, kind: str) -> dict:
    """A file this algorithm saved: kind "checkpoint" (checkpoint.pt, the training state that --resume
    continues) or "pretrain" / "final" (an export, the agent that --pretrained starts from);
    ConfigError naming what the file is otherwise."""
    flag = "--resume" if kind == "checkpoint" else "--pretrained"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        fmt, algo, saved_kind = saved["format"], saved["algo"], saved.get("kind", "checkpoint")
        saved["agent"]["actor"]
    except Exception as exc:
        raise ConfigError(f"{flag}: cannot read checkpoint '{path}': {first_line(exc)}")
    if saved_kind == "checkpoint" != kind:
        raise ConfigError(
            f"{flag}: '{path}' is the training state of a run, not a finished {kind}; continue that run with --resume {path.parent}"
        )
    if (fmt, algo, saved_kind) != (CHECKPOINT_FORMAT, ALGO, kind):
        what = "checkpoint" if saved_kind == "checkpoint" else f"{saved_kind} export"
        raise ConfigError(
            f"{flag}: '{path}' is a {what} of algorithms/{algo}.py (format {fmt}), not a {kind} of algorithms/{ALGO}.py (format {CHECKPOINT_FORMAT})"
        )
    return saved


def parse_args(argv: list[str]) -> tuple[Config, Optional[dict]]:
    """tyro CLI -> (config, checkpoint to resume or None). --config FILE: the file's values are
    the defaults that flags override. --resume RUN_DIR: the run's saved config is the default;
    flags override it, except the RESUME_FIXED fields."""
    cfg = tyro.cli(Config, args=argv)
    if cfg.resume is not None:
        if cfg.config is not None:
            raise ConfigError("--resume continues with the run's saved config; leave out --config")
        path = Path(cfg.resume) / "checkpoint.pt"
        if not path.is_file():
            raise ConfigError(
                f"--resume: no checkpoint.pt in '{cfg.resume}' (a run folder of this project's algorithm files, after its first checkpoint)"
            )
        checkpoint = read_saved(path, "checkpoint")
        saved = replace(Config(**checkpoint["config"]), resume=cfg.resume)
        cfg = tyro.cli(Config, args=argv, default=saved)
        changed = [name for name in RESUME_FIXED if getattr(cfg, name) != getattr(saved, name)]
        budget = PHASE_BUDGET[checkpoint["phase"]]
        if getattr(cfg, budget) < checkpoint["step"]:
            raise ConfigError(
                f"--resume: {budget}={getattr(cfg, budget)} is below the {checkpoint['step']} steps the run has made in {checkpoint['phase']}"
            )
        if changed:
            raise ConfigError(
                f"--resume: {', '.join(changed)} cannot change in a resumed run (saved: {', '.join(f'{n}={getattr(saved, n)}' for n in changed)})"
            )
        return cfg, checkpoint
    if cfg.config is not None:
        try:  # the file's values (lists become tuples), type-checked before tyro sees them
            values = yaml.safe_load(Path(cfg.config).read_text()) or {}
            if not isinstance(values, dict):
                raise TypeError("expected a mapping of field names to values")
            defaults = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        except (OSError, yaml.YAMLError, TypeError) as exc:
            raise ConfigError(f"cannot use config file '{cfg.config}': {first_line(exc)}")
        check_types(defaults, f"config file '{cfg.config}': ")
        cfg = tyro.cli(Config, args=argv, default=replace(defaults, config=cfg.config))
    return cfg, None


# ----------------------------------------------------------------------------------------------
# Environments and scores: D4RL names -> gymnasium envs, reference scores
# ----------------------------------------------------------------------------------------------
# D4RL env name -> (gymnasium id, reference returns (random, expert) of the normalised score,
# episode length where D4RL's differs from the gymnasium id's: pen has 100 steps in D4RL, 200 in
# gymnasium-robotics). The references are D4RL's, except ant's: D4RL's (-325.6, 3879.7) are Ant-v2's,
# so ant has this project's Ant-v5 ones (results/README.md; report.py --reference gives D4RL's).
# AntMaze's env comes from its dataset (make_env); its score is the success rate.
ENVS = {
    "halfcheetah": ("HalfCheetah-v5", (-280.178953, 12135.0), None),
    "hopper": ("Hopper-v5", (-20.272305, 3234.3), None),
    "walker2d": ("Walker2d-v5", (1.629008, 4592.3), None),
    "ant": ("Ant-v5", (-79.548, 2328.3), None),
    "pen": ("AdroitHandPen-v1", (96.262799, 3076.833), 100),
    "door": ("AdroitHandDoor-v1", (-56.512833, 2880.569), None),
    "antmaze": (None, (0.0, 1.0), None),
}
ADROIT = ("pen", "door")  # need gymnasium-robotics


def normalized_score(base: str, returns):
    low, high = ENVS[base][1]
    return 100.0 * (np.asarray(returns) - low) / (high - low)


# The umaze evaluation maze: the walls of Minari's umaze training maze with one reset cell r and one
# goal cell g, D4RL's U_MAZE_TEST (its antmaze-umaze(-diverse)-v2 evaluations) with the rows in
# gymnasium-robotics' order (it puts row 0 at the largest y, D4RL at the smallest), so r and g swap rows.
UMAZE_EVAL = [[1, 1, 1, 1, 1], [1, "g", 0, 0, 1], [1, 1, 1, 0, 1], [1, "r", 0, 0, 1], [1, 1, 1, 1, 1]]


def make_env(base: str, dataset_id: Optional[str] = None) -> gym.Env:
    """The environment of the dataset. AntMaze: the dataset's evaluation env (its maze and goal), on
    the training walls (umaze: UMAZE_EVAL), ending at the goal as D4RL's evaluation envs do."""
    if base in ADROIT or base == "antmaze":
        try:
            import gymnasium_robotics  # noqa: F401  (registers the Adroit and AntMaze environments)
        except ImportError:
            raise ConfigError(
                f"'{base}' needs the gymnasium-robotics environments: pip install gymnasium-robotics==1.4.2"
            )
    mujoco.set_mju_user_warning(mujoco_warning)
    if base == "antmaze":
        import minari

        metadata = minari.load_dataset(dataset_id).storage.metadata
        if "eval_env_spec" not in metadata:  # Minari would fall back to the training env's random goals
            raise ConfigError(f"dataset {dataset_id} has no evaluation env spec, which sets AntMaze's maze and goal")
        spec = gym.envs.registration.EnvSpec.from_json(metadata["eval_env_spec"])
        umaze = spec.id.startswith("AntMaze_UMaze")  # Minari's umaze eval map has mirrored walls (its issue #304)
        spec.kwargs |= {"continuing_task": False} | ({"maze_map": UMAZE_EVAL} if umaze else {})
        env = gym.make(spec)
        os.unlink(env.unwrapped.tmp_xml_file_path)  # gymnasium-robotics leaves the compiled maze's file in /tmp
        return gym.wrappers.FlattenObservation(env)
    gym_id, _, steps = ENVS[base]
    env = gym.make(gym_id, **({} if steps is None else {"max_episode_steps": steps}))
    return D4RLAdroit(env) if base in ADROIT else env


class D4RLAdroit(gym.Wrapper):
    """pen and door as D4RL (mj_envs) defines them, where gymnasium-robotics 1.4.2 differs; D4RL's
    reference returns were measured so. A pen episode ends when the pen drops (height < 0.075; the
    -5 penalty of that step is the same in both). Door's reward has -0.1 |palm - handle| where
    gymnasium-robotics 1.2.1 to 1.4.2 add +0.1 |palm - handle| (a sign error; their PR #220), equal up
    to float rounding."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        env = self.unwrapped
        if hasattr(env, "handle_site_id"):  # door
            reward -= 0.2 * np.linalg.norm(
                env.data.site_xpos[env.grasp_site_id] - env.data.site_xpos[env.handle_site_id]
            )
        else:  # pen
            terminated = bool(env.data.xpos[env.obj_body_id][2] < 0.075)
        return obs, reward, terminated, truncated, info


SHOWN_ONCE: set[str] = set()  # the harmless MuJoCo warnings this process has shown


def mujoco_warning(message: str) -> None:
    """MuJoCo's own (C-level) warnings, each printed as MuJoCo would, to stderr; only "compiler
    attribute 'settotalmass' is deprecated" is shown once per process, not once per HalfCheetah-v5
    made. It is harmless: MuJoCo 4 still applies the attribute (the model's mass is 14, as in v5)."""
    if "'settotalmass' is deprecated" in message:
        if message in SHOWN_ONCE:
            return
        SHOWN_ONCE.add(message)
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Replay buffer
# ----------------------------------------------------------------------------------------------
class ReplayBuffer:
    """Transitions as rows [obs | action | reward | next_obs | done] of one device tensor, so a
    batch is one gather. When full, new rows overwrite the oldest (FIFO)."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        self.sizes = [obs_dim, act_dim, 1, obs_dim, 1]
        self.rows = torch.zeros(capacity, sum(self.sizes), device=device)
        self.capacity, self.size, self.ptr = capacity, 0, 0
        # Host staging row: one env step is written into it and copied to the device once.
        self.stage = torch.zeros(sum(self.sizes), pin_memory=device.type == "cuda")
        self.stage_np = self.stage.numpy()
        self.offsets = np.cumsum([0] + self.sizes)

    def extend(self, rows: torch.Tensor) -> None:
        """Append rows in order, to the same slots as adding them one by one would."""
        n = rows.shape[0]
        start = (self.ptr + max(n - self.capacity, 0)) % self.capacity
        rows = rows[-self.capacity :].to(self.rows.device)
        first = min(len(rows), self.capacity - start)
        self.rows[start : start + first] = rows[:first]
        self.rows[: len(rows) - first] = rows[first:]
        self.ptr, self.size = (self.ptr + n) % self.capacity, min(self.size + n, self.capacity)

    def add(self, obs, action, reward, next_obs, done) -> None:
        for k, value in enumerate((obs, action, reward, next_obs, done)):
            self.stage_np[self.offsets[k] : self.offsets[k + 1]] = value
        self.rows[self.ptr].copy_(self.stage)  # blocking: the staging row is rewritten next step
        self.ptr, self.size = (self.ptr + 1) % self.capacity, min(self.size + 1, self.capacity)

    def slots(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Row indices of the given shape, uniform over the stored rows."""
        return torch.randint(0, self.size, shape, device=self.rows.device)

    def sample(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.rows[self.slots(shape)]

    def split(self, batch: torch.Tensor):
        """Rows -> (obs, action, reward, next_obs, done), reward and done without the last dim."""
        obs, act, rew, next_obs, done = torch.split(batch, self.sizes, dim=-1)
        return obs, act, rew.squeeze(-1), next_obs, done.squeeze(-1)

    def state_dict(self) -> dict:
        return {"rows": self.rows[: self.size].cpu(), "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:
        """Rows back into the same slots; a buffer that is not full (e.g. a resumed run given a
        larger budget) continues after its last row."""
        self.size = len(state["rows"])
        self.ptr = state["ptr"] if self.size == self.capacity else self.size
        self.rows[: self.size] = state["rows"].to(self.rows.device)


# ----------------------------------------------------------------------------------------------
# Evaluation and Q diagnostics
# ----------------------------------------------------------------------------------------------
def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """Monte-Carlo return-to-go G_t = r_t + gamma G_{t+1} along one episode (G_T = 0)."""
    out = np.zeros(len(rewards), dtype=np.float64)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b (ties handled as in scipy.stats.kendalltau); nan if either is constant."""
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    denominator = math.sqrt(np.count_nonzero(dx) * np.count_nonzero(dy))
    return float((dx * dy).sum() / denominator) if denominator > 0 else float("nan")


def windowed_kendall_tau(q_est: np.ndarray, q_true: np.ndarray, windows: int) -> list[float]:
    """The paper's rank metric for one episode: cut the state-action pairs into `windows`
    consecutive windows and compute Kendall's tau between estimated and true Q in each."""
    taus = [
        kendall_tau(a, b) for a, b in zip(np.array_split(q_est, windows), np.array_split(q_true, windows)) if len(a) > 1
    ]
    return [t for t in taus if not math.isnan(t)]


class Evaluator:
    """Runs one episode per env in `envs` together (one batched deterministic policy forward per
    step) and computes the normalised score and the Q diagnostics on the collected rollouts.
    Every evaluation starts from the same seeded initial states, so scores compare across
    evaluations and runs; it draws nothing from the training RNG. The Q diagnostics compare Q with
    the discounted return of the rewards the critic learns, reward * reward_scale + reward_bias;
    scores use the raw returns."""

    def __init__(self, base: str, envs: list[gym.Env], cfg: Config, device, reward_scale=1.0, reward_bias=0.0):
        self.base, self.envs, self.cfg, self.device = base, envs, cfg, device
        self.reward_scale, self.reward_bias = reward_scale, reward_bias
        self.seeds = [cfg.seed * 1000 + 500 + i for i in range(len(envs))]

    @torch.no_grad()
    def __call__(self, agent) -> dict[str, float]:
        obs = np.stack([env.reset(seed=s)[0] for env, s in zip(self.envs, self.seeds)]).astype(np.float32)
        episodes = [{"obs": [], "act": [], "rew": [], "terminated": False} for _ in self.envs]
        active = list(range(len(self.envs)))
        while active:
            actions = agent.actor(torch.as_tensor(obs[active], device=self.device), deterministic=True)[0].cpu().numpy()
            still = []
            for i, action in zip(active, actions):
                ep = episodes[i]
                ep["obs"].append(obs[i].copy())
                ep["act"].append(action)
                next_obs, reward, terminated, truncated, _ = self.envs[i].step(action)
                ep["rew"].append(reward)
                obs[i] = next_obs
                if terminated or truncated:
                    ep["terminated"] = terminated
                else:
                    still.append(i)
            active = still
        returns = np.array([sum(ep["rew"]) for ep in episodes])
        result = {
            "return": float(returns.mean()),
            "return_std": float(returns.std()),
            # a hopper or walker2d standing still shows as full-length episodes with a near-constant return
            "episode_length": float(np.mean([len(ep["rew"]) for ep in episodes])),
            "normalized_score": float(normalized_score(self.base, returns).mean()),
        }
        result.update(self.q_diagnostics(agent, episodes))
        return result

    def q_diagnostics(self, agent, episodes: list[dict]) -> dict[str, float]:
        obs, act, q_true, lengths = [], [], [], []
        for ep in episodes:
            n = len(ep["rew"]) if ep["terminated"] else max(len(ep["rew"]) - self.cfg.mc_tail_steps, 0)
            if n == 0:
                continue
            obs.append(np.asarray(ep["obs"][:n]))
            act.append(np.asarray(ep["act"][:n]))
            rewards = np.asarray(ep["rew"]) * self.reward_scale + self.reward_bias
            q_true.append(discounted_returns(rewards, self.cfg.gamma)[:n])
            lengths.append(n)
        nan = float("nan")
        if not lengths:
            return dict.fromkeys(("q_bias", "q_bias_min", "kendall_tau", "q_true", "q_std_policy", "q_std_random"), nan)
        obs_t = torch.as_tensor(np.concatenate(obs), device=self.device)
        act_t = torch.as_tensor(np.concatenate(act), device=self.device)
        q_members = agent.critic(obs_t, act_t)
        q_mean, q_min = q_members.mean(0).cpu().numpy(), q_members.min(0).values.cpu().numpy()
        q_true_all = np.concatenate(q_true)
        scale = np.abs(q_true_all).mean()
        taus = []
        for q_est_ep, q_true_ep in zip(np.split(q_mean, np.cumsum(lengths)[:-1]), q_true):
            taus += windowed_kendall_tau(q_est_ep, q_true_ep, self.cfg.kendall_windows)
        rng = np.random.default_rng(self.cfg.seed + 12345)
        random_actions = torch.as_tensor(
            rng.uniform(-1, 1, tuple(act_t.shape)), dtype=torch.float32, device=self.device
        )
        return {
            "q_bias": float((q_mean.mean() - q_true_all.mean()) / scale) if scale > 0 else nan,
            "q_bias_min": float((q_min.mean() - q_true_all.mean()) / scale) if scale > 0 else nan,
            "kendall_tau": float(np.mean(taus)) if taus else nan,
            "q_true": float(q_true_all.mean()),
            "q_std_policy": float(q_members.std(0).mean()),  # on the evaluated policy's actions
            "q_std_random": float(agent.critic(obs_t, random_actions).std(0).mean()),
        }


# ----------------------------------------------------------------------------------------------
# Run folder: name, metrics, checkpoint, signals, divergence
# ----------------------------------------------------------------------------------------------
# Exit codes: 0 finished, 2 bad input, 3 diverged; a SIGINT / SIGTERM exits with 128 + its number
# (130 / 143) once the checkpoint is written.
EXIT_DIVERGED = 3
# Keys of every metrics.jsonl record, in this order, in every algorithm file (None where a value
# does not exist yet); an algorithm's own losses follow them.
RECORD_KEYS = tuple(
    "phase step env_steps return return_std episode_length normalized_score q_true q_bias q_bias_min kendall_tau "
    "q_std_policy q_std_random alpha critic_loss actor_loss".split()
)
MJ_STATE = mujoco.mjtState.mjSTATE_INTEGRATION  # everything mj_step reads, warm-start included


class Stopped(Exception):
    """A SIGINT or SIGTERM arrived; the checkpoint holds the state after the step in progress."""


class Diverged(Exception):
    """A loss or a parameter is not finite; the last checkpoint is the last good state."""


def atomic_write(path: Path, write) -> None:
    """write(file) into a temporary file, then rename it over path: a reader, a crash or a kill never
    sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def new_run_dir(cfg: Config) -> Path:
    """<out_dir>/<env>__<algo>[-<run_name>]__<seed>__<unix time>; '-1', '-2', ... is appended when
    that folder exists (mkdir is atomic, so two runs started in the same second never share one)."""
    stem = f"{cfg.env}__{ALGO}{'-' + cfg.run_name if cfg.run_name else ''}__{cfg.seed}__{int(time.time())}"
    for k in itertools.count():
        path = Path(cfg.out_dir) / (stem if k == 0 else f"{stem}-{k}")
        with contextlib.suppress(FileExistsError):
            path.mkdir(parents=True)
            return path


def lock_run_dir(run_dir: Path):
    """Hold run_dir for this process: a second process on the same folder (a double launch, a requeue
    beside a stale job) is refused in one line. The kernel drops the lock when its process ends,
    kill -9 included, so a dead run never blocks its resume. Returns the open lock file."""
    handle = open(run_dir / ".lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(f"run folder '{run_dir}' is in use by another process; wait for it to end or stop it first")
    return handle


class StopSignal:
    """SIGINT and SIGTERM only record the signal; the train loop finishes the step in progress,
    writes the checkpoint and exits with 128 + the signal number. A second signal acts at once
    (the previous checkpoint stays)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame) -> None:
        self.signum = signum
        self.restore()

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def tensors(tree) -> list[torch.Tensor]:
    """The tensors of a nested state dict."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else []
    return [t for value in values for t in tensors(value)]


def env_state(env: gym.Env) -> dict:
    """The running episode exactly: MuJoCo integration state, the body poses of the model (Adroit's
    reset moves its goal there), what pen's and AntMaze's resets set outside them, time-limit
    counter, env RNG."""
    u = env.unwrapped
    state = np.empty(mujoco.mj_stateSize(u.model, MJ_STATE))
    mujoco.mj_getState(u.model, u.data, state, MJ_STATE)
    model = {"body_pos": u.model.body_pos.copy(), "body_quat": u.model.body_quat.copy()}
    # set by the reset of pen (its lengths) and of AntMaze (its goal), outside the MuJoCo state
    attributes = {k: copy.deepcopy(getattr(u, k)) for k in ("pen_length", "tar_length", "goal") if hasattr(u, k)}
    steps = env.get_wrapper_attr("_elapsed_steps")  # of the TimeLimit wrapper
    rng = u.np_random.bit_generator.state
    return {"mujoco": state, "model": model, "attributes": attributes, "elapsed_steps": steps, "np_random": rng}


def restore_env_state(env: gym.Env, saved: dict) -> None:
    u = env.unwrapped
    u.model.body_pos[:], u.model.body_quat[:] = saved["model"]["body_pos"], saved["model"]["body_quat"]
    mujoco.mj_setState(u.model, u.data, saved["mujoco"], MJ_STATE)
    mujoco.mj_forward(u.model, u.data)
    for name, value in saved["attributes"].items():
        setattr(u, name, copy.deepcopy(value))
    env.set_wrapper_attr("_elapsed_steps", saved["elapsed_steps"])
    u.np_random.bit_generator.state = saved["np_random"]


def rng_state(device: torch.device) -> dict:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": np.random.get_state()}


def restore_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    np.random.set_state(state["numpy"])


@dataclass
class Run:
    """Everything a train loop touches besides its own loop variables, and the files of its folder:
    metrics.jsonl (+ wandb), checkpoint.pt, pretrain.pt / final.pt and summary.json."""

    cfg: Config
    dir: Path
    device: torch.device
    agent: object
    evaluate: Evaluator
    dataset: Optional[dict]  # {"id", "fingerprint"}; None for a run without a dataset
    obs_dim: int
    act_dim: int
    stop: StopSignal
    records: list[dict] = field(default_factory=list)  # of metrics.jsonl; a resumed run's from its checkpoint
    wall_before: float = 0.0  # seconds run before this process (resumed runs)
    pretrain_time_s: Optional[float] = None
    wandb: object = None
    bad: dict = field(default_factory=dict)  # loss name -> device flag: not finite at some update
    started: float = field(default_factory=time.time)

    def wall_time(self) -> float:
        return self.wall_before + time.time() - self.started

    def write(self, record: Optional[dict] = None) -> None:
        """Append a record (non-finite floats become null) and rewrite metrics.jsonl atomically."""
        if record is not None:
            finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            self.records.append(record := {**dict.fromkeys(RECORD_KEYS), **finite})
            if self.wandb is not None:
                self.wandb.log({f"{record['phase']}/{k}": v for k, v in record.items() if isinstance(v, (int, float))})
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        atomic_write(self.dir / "metrics.jsonl", lambda f: f.write(text.encode()))

    def watch(self, values: dict) -> None:
        """Fold each loss into one "not finite" flag per name on the device: no host sync per update."""
        for name, value in values.items():
            if isinstance(value, torch.Tensor):  # floats are config values, finite by the checks
                flag = ~torch.isfinite(value).all()
                self.bad[name] = flag if name not in self.bad else self.bad[name] | flag

    def check(self, phase: str, step: int) -> None:
        """Diverged if a watched loss, a parameter or an optimiser moment is not finite; called at
        evaluations and before checkpoints."""
        for name, flag in self.bad.items():
            if bool(flag):
                raise Diverged(f"{name} not finite in {phase} at step {step}")
        for name, state in self.agent.state_dict().items():
            if any(not bool(torch.isfinite(t).all()) for t in tensors(state) if t.is_floating_point()):
                raise Diverged(f"{name} not finite in {phase} at step {step}")

    def save(self, kind: str, phase: str = "", step: int = 0, loop: Optional[dict] = None) -> None:
        """checkpoint.pt (kind "checkpoint"): the whole training state after `step` steps of `phase`,
        written only after the finite check passes, so it always holds the last good state.
        pretrain.pt / final.pt: the agent (networks, optimisers, temperature) and its config."""
        state = {"format": CHECKPOINT_FORMAT, "algo": ALGO, "config": asdict(self.cfg), "dataset": self.dataset}
        if kind == "checkpoint":
            self.check(phase, step)
            state |= {"phase": phase, "step": step, "loop": loop, "rng": rng_state(self.device)}
            state |= {"records": self.records, "wall_time_s": self.wall_time(), "pretrain_time_s": self.pretrain_time_s}
        else:
            state |= {"kind": kind, "obs_dim": self.obs_dim, "act_dim": self.act_dim}
        state["agent"] = self.agent.state_dict()
        atomic_write(self.dir / f"{kind}.pt", lambda f: torch.save(state, f))

    def end_pretraining(self) -> tuple[int, None]:
        """pretrain.pt and the pretraining's time, then the checkpoint at the start of finetuning;
        returns that start (step 0, no loop state)."""
        self.pretrain_time_s = self.wall_time()
        self.save("pretrain")
        self.save("checkpoint", "finetune", 0, None)
        return 0, None

    def write_summary(self, status: str, error: Optional[str] = None) -> None:
        """summary.json: status (finished / interrupted / diverged), scores, final Q diagnostics,
        wall time, device and versions; the same keys in every algorithm file."""
        from importlib.metadata import version

        online = [r for r in self.records if r["phase"] != "pretrain"]
        last = online[-1] if online else {}
        scores = [r["normalized_score"] for r in online if r["normalized_score"] is not None]
        cuda = self.device.type == "cuda"
        summary = {
            "status": status,
            "error": error,
            "algo": ALGO,
            **{k: getattr(self.cfg, k) for k in ("env", "seed", "run_name")},
            "dataset": self.dataset,
            "env_steps": last.get("env_steps", 0),
            "pretrained_score": online[0]["normalized_score"] if online and online[0]["env_steps"] == 0 else None,
            "final_score": last.get("normalized_score"),
            "best_score": max(scores) if scores else None,
            **{f"final_{k}": last.get(k) for k in ("return", "q_bias", "kendall_tau", "q_std_policy")},
            "wall_time_s": round(self.wall_time(), 1),
            "pretrain_time_s": None if self.pretrain_time_s is None else round(self.pretrain_time_s, 1),
            "resume_command": None if status == "finished" else f"python algorithms/{ALGO}.py --resume {self.dir}",
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device)
            if cuda
            else platform.processor() or platform.machine(),
            "versions": {"python": platform.python_version()}
            | {name: version(name) for name in ("torch", "numpy", "gymnasium", "mujoco", "minari")},
        }
        atomic_write(self.dir / "summary.json", lambda f: f.write((json.dumps(summary, indent=2) + "\n").encode()))


def seconds_per_call(fn, device: torch.device, calls: int) -> float:
    """Seconds per call of fn after one warm-up call. The RNG states are restored afterwards, so
    timing leaves the run exactly as it was."""
    state, sync = rng_state(device), torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    restore_rng_state(state, device)
    return (time.perf_counter() - start) / calls


def announce_time(parts: list[tuple[str, int, float]]) -> None:
    """Print the time the rest of the run will spend in updates, from (phase, steps left, seconds
    per step) measured on this device, and FIRST_RESULT when that is more than a day."""
    hours = sum(n * s / 3600 for _, n, s in parts)
    text = "; ".join(f"{name}: {n:,} steps x {1000 * s:.1f} ms = {n * s / 3600:.2f} h" for name, n, s in parts)
    if parts:
        print(
            f"{ALGO}.py: estimated time in updates (evaluations and env steps not counted): {text}; total {hours:.2f} h",
            file=sys.stderr,
        )
    if hours > 24:
        print(f"{ALGO}.py: that is days on this device. {FIRST_RESULT}", file=sys.stderr)


@contextlib.contextmanager
def open_run(cfg: Config, checkpoint: Optional[dict], agent, evaluate: Evaluator, device, dataset, first: tuple):
    """A run's life. Opens the folder of a new run and writes its first checkpoint (first = phase and
    loop state at step 0), or reopens a resumed one and restores its state into agent and RNGs; yields
    (run, phase, step, loop state) to continue from. Then it writes the summary; a signal or a
    divergence inside ends the process with its exit code."""
    stop = StopSignal()  # from here on, a signal stops the run at its next checkpoint
    if checkpoint is not None:
        agent.load_state_dict(checkpoint["agent"])
        restore_rng_state(checkpoint["rng"], device)
    run_dir = new_run_dir(cfg) if checkpoint is None else Path(cfg.resume)
    lock = lock_run_dir(run_dir)
    config = {**asdict(cfg), "dataset_id": None if dataset is None else dataset["id"], "device_resolved": str(device)}
    atomic_write(run_dir / "config.yaml", lambda f: f.write(yaml.safe_dump(config, sort_keys=False).encode()))
    env = evaluate.envs[0]
    run = Run(
        cfg, run_dir, device, agent, evaluate, dataset, env.observation_space.shape[0], env.action_space.shape[0], stop
    )
    position = (first[0], 0, first[1])
    if checkpoint is not None:
        position = (checkpoint["phase"], checkpoint["step"], checkpoint["loop"])
        run.records, run.wall_before, run.pretrain_time_s = (
            checkpoint[k] for k in ("records", "wall_time_s", "pretrain_time_s")
        )
    run.write()  # a resumed run drops the records written after its checkpoint: it writes them again
    if cfg.track:
        import wandb

        # The id follows the folder, so a resumed run continues the same wandb run.
        run_id = hashlib.blake2b(str(run_dir.resolve()).encode(), digest_size=8).hexdigest()
        run.wandb = wandb.init(
            project=cfg.wandb_project,
            group=ALGO,
            name=run_dir.name,
            id=run_id,
            resume="allow",
            config=asdict(cfg),
            dir=str(run_dir),
        )
    if checkpoint is None:
        run.save("checkpoint", *position)  # from here on, --resume works
    status, error = "finished", None
    try:
        yield (run, *position)
    except Stopped:
        status = "interrupted"
    except Diverged as exc:
        status, error = "diverged", str(exc)
    run.write_summary(status, error)
    if run.wandb is not None:
        run.wandb.finish()
    lock.close()
    stop.restore()
    if status == "interrupted":
        resume = f"python algorithms/{ALGO}.py --resume {run.dir}"
        print(f"{ALGO}.py: stopped by signal {stop.signum}; checkpoint written. Resume with: {resume}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    if status == "diverged":
        print(
            f"{ALGO}.py: error: diverged: {error}; the last good state is {run.dir / 'checkpoint.pt'}", file=sys.stderr
        )
        sys.exit(EXIT_DIVERGED)


if __name__ == "__main__":
    main()
