"""ODT: Online Decision Transformer, offline pretraining and online finetuning of one return-conditioned policy.

Paper: Zheng, Zhang & Grover, "Online Decision Transformer", ICML 2022 (arXiv 2202.05607, code
facebookresearch/online-dt, read at commit c376fa1: main.py, trainer.py, data.py,
replay_buffer.py, evaluation.py, lamb.py, decision_transformer/models/). One of the baselines of
the SO2 paper's Table 1 (Zhang et al., AAAI 2024).
Pipeline in this file, top to bottom:
  1. the D4RL-style dataset, resolved to a Minari dataset (generated on the spot for *-random by
     scripts/make_dataset.py), cut into trajectories at terminations and truncations; states
     normalised with the mean and std of all dataset states (+1e-6); actions clamped to
     [-1 + 1e-6, 1 - 1e-6] so that their tanh-Gaussian log-likelihood is finite;
  2. offline pretraining: segments of K = 20 steps (return-to-go, state, action) from trajectories
     drawn with probability proportional to their length, a uniform start, left-padded; the loss is
     -(mean log-likelihood of the actions over real steps + temperature x entropy), the entropy a
     one-sample estimate over ALL K positions, padding included (the release's mean); LAMB with a
     linear learning-rate warm-up; the temperature is stepped towards a target entropy of -|A|;
  3. online finetuning: a trajectory replay of 1,000 trajectories, seeded with the highest-return
     dataset trajectories (ascending, so FIFO replaces the worst first). Each iteration rolls out
     one episode with the stochastic policy conditioned on the online return-to-go target, adds it
     to the replay with returns-to-go recomputed from the rewards it received (hindsight
     relabelling), then makes 300 updates of the same loss; optimiser, warm-up and temperature
     carry on from pretraining;
  4. batched evaluation: the deterministic policy tanh(mean), conditioned on the evaluation target
     and the last 5 steps. There is no Q function, so the Q diagnostics (q_bias, kendall_tau,
     q_std) do not apply: they are null in metrics.jsonl and summary.json, and the run says so.
The run folder (checkpoint, --resume, signals, divergence) is the same in every algorithm file.

Defaults follow the release's main.py (its values are those of hopper-medium): a GPT-2 of 4 layers,
4 heads, embedding 512, inner width 2,048, ReLU, dropout 0.1 (embedding, attention, residual),
pre-LayerNorm blocks with a final LayerNorm, N(0, 0.02) weights inside the transformer; returns-to-
go scaled by 0.001; a tanh-Gaussian head (two linear layers, orthogonal init) with log-std squashed
into [-5, 2]; LAMB lr 1e-4, weight decay 5e-4 on every parameter, 10k warm-up steps, gradients
clipped to norm 0.25; temperature 0.1 at the start, Adam 1e-4; batch 256; 5,000 pretraining
updates; 300 updates per online iteration; evaluation and rollouts on the last 5 steps.
Return-to-go targets (evaluation / online) per env: hopper 3600 / 7200 (main.py's defaults),
walker2d 5000 / 10000, halfcheetah 6000 / 12000 (these two from third-party scripts that reproduce
the paper's per-env table, umkiyoung/EXplorativeDT; the release has no per-env table); other envs
need --eval-rtg and --online-rtg. Other per-env values: configs/odt/.
Deliberate differences from the release:
  - LAMB is written here (the release's lamb.py, a port of NVIDIA's FusedLAMB) without its internal
    clip of the global gradient norm at 1.0, which never acts after the trainer's clip to 0.25.
  - the online budget is counted in env steps (the SO2 paper's 100k; the release: 1,500
    iterations), evaluated when the env steps reach a multiple of eval_every (the policy as of its
    last update; the release: every 10 iterations); the episode that reaches the budget ends the run.
  - the temperature is saved in checkpoints (the release keeps log_temperature outside the
    model's state_dict) and is a float32 parameter on the run's device (the release: float64 on CPU).
  - --dropout sets the embedding dropout too; the release's stays at GPT2Config's 0.1 whatever its
    --dropout (the same at the default).
  - rows after a dataset's last termination or truncation would form a last trajectory (the
    release's conversion script drops such an unfinished episode); this project's datasets end
    every episode with one of the two.
  - no timestep embedding, as the release by default (--ordering 0: its timestep table is never
    used); the time steps of a segment are not stored.
  - the pretraining set keeps every trajectory but the lowest-return one, as the release's
    _load_dataset does (its cumulative-length cut drops the last trajectory of the sorted list).
  - environments are gymnasium v5 MuJoCo and Minari datasets (the release used D4RL on gym).
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
import subprocess
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

ALGO = "odt"
FIRST_RESULT = (
    "For a first result on a CPU, shrink the model and the budgets as configs/sweeps/odt_cpu.yaml does: "
    "--embed-dim 128 --n-layers 3 --batch-size 64 --warmup-steps 4000 --pretrain-steps 2000 "
    "--online-steps 10000 --updates-per-iteration 30"
)
REPO_ROOT = Path(__file__).resolve().parent.parent
LOG_STD_RANGE = (-5.0, 2.0)  # release: DiagGaussianActor's log_std_bounds
GRAD_CLIP = 0.25  # release trainer: clip_grad_norm_(model.parameters(), 0.25)
# Return-to-go targets (evaluation, online) per env; see the header for their sources.
RTG_TARGETS = {"hopper": (3600.0, 7200.0), "walker2d": (5000.0, 10000.0), "halfcheetah": (6000.0, 12000.0)}


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclass
class Config:
    env: str = "hopper-random"
    """D4RL-style dataset name: {halfcheetah,hopper,walker2d,ant}-{random,medium,medium-replay,
    medium-expert,expert}, {pen,door}-{random,medium,human,cloned,expert} or antmaze-<maze> (README); ant,
    pen, door and antmaze need --eval-rtg and --online-rtg."""
    config: Optional[str] = None
    """YAML file of field values (e.g. configs/odt/hopper.yaml); flags given on the command line
    override it."""
    resume: Optional[str] = None
    """Run folder to continue from its checkpoint.pt, in either phase; its saved config is the
    default and flags override it (not env, seed, or the model sizes)."""
    seed: int = 0
    """Seed of torch, numpy and the environments; same seed on CPU gives identical metrics."""
    device: str = "auto"
    """Torch device: 'auto' picks cuda when available, else cpu."""
    context_length: int = 20
    """K: steps per training segment (release: --K 20)."""
    eval_context_length: int = 5
    """Steps of history the policy sees in rollouts and evaluation (release: 5), left-padded to K."""
    embed_dim: int = 512
    """Transformer width (release: 512); the MLPs are 4x as wide."""
    n_layers: int = 4
    """Transformer blocks (release: 4)."""
    n_heads: int = 4
    """Attention heads (release: 4); must divide embed_dim."""
    dropout: float = 0.1
    """Dropout of the embeddings, the attention weights and both residual branches (release: 0.1)."""
    lr: float = 1e-4
    """LAMB learning rate after warm-up (release: 1e-4)."""
    weight_decay: float = 5e-4
    """LAMB decoupled weight decay, on every parameter (release: 5e-4); 0 also turns off LAMB's trust
    ratio (as the release's lamb.py), leaving Adam."""
    warmup_steps: int = 10_000
    """Linear learning-rate warm-up over this many updates, counted across both phases (release: 10k)."""
    init_temperature: float = 0.1
    """Initial entropy temperature (release: 0.1)."""
    temperature_lr: float = 1e-4
    """Adam learning rate of the log-temperature (release: 1e-4)."""
    target_entropy: Optional[float] = None
    """Entropy the temperature steers to; None: -|A| (release)."""
    reward_scale: Optional[float] = None
    """Returns-to-go are multiplied by this in training and rollouts; None: the release's, 1 on
    AntMaze and 0.001 elsewhere."""
    batch_size: int = 256
    """Segments per update (release: 256)."""

    pretrain_steps: int = 5_000
    """Offline updates (release: 1 iteration x 5,000)."""
    pretrain_eval_every: int = 5_000
    """Evaluate every this many pretraining updates (and at the end of pretraining)."""
    pretrained: Optional[str] = None
    """Path of a finished pretraining (pretrain.pt of an earlier run); skips pretraining."""
    random_dataset_steps: int = 1_000_000
    """Size of a *-random dataset generated when none is on disk (D4RL: 1M). Other sizes are
    stored under their own id (local/<env>/<quality>-n<steps>-v0), never as the 1M dataset."""

    online_steps: int = 100_000
    """Online env steps in finetuning (the SO2 paper's budget; the release: 1,500 iterations); 0
    stops after pretraining."""
    replay_size: int = 1_000
    """Trajectories in the online replay (release: 1,000)."""
    updates_per_iteration: int = 300
    """Updates after each online episode (release: 300)."""
    eval_rtg: Optional[float] = None
    """Return-to-go target of evaluation episodes; None: the env's value in RTG_TARGETS."""
    online_rtg: Optional[float] = None
    """Return-to-go target of online exploration episodes; None: the env's value in RTG_TARGETS."""

    eval_every: int = 10_000
    """Evaluate when the online env steps reach a multiple of this (and at the start and end)."""
    eval_episodes: int = 10
    """Evaluation episodes, run together with one batched policy forward per step (release: 10)."""

    checkpoint_every: int = 10_000
    """Write checkpoint.pt every this many steps of the phase (updates in pretraining, env steps
    online, at the end of an iteration), besides the phase boundary, the end and a SIGINT / SIGTERM."""
    out_dir: str = "runs"
    """Runs are written to <out_dir>/<env>__odt[-<run_name>]__<seed>__<unix time>/."""
    run_name: Optional[str] = None
    """Name added to the run folder to tell variants apart (letters, digits, '.', '-')."""
    track: bool = False
    """Log to Weights & Biases (works with WANDB_MODE=offline)."""
    wandb_project: str = "offline-to-online"
    """W&B project name (runs are grouped by algorithm)."""


# Fields a resumed run cannot change: they define the data, networks, optimisers or evaluation.
RESUME_FIXED = (
    "env", "seed", "context_length", "eval_context_length", "embed_dim", "n_layers", "n_heads", "random_dataset_steps",
    "eval_episodes", "pretrained", "lr", "weight_decay", "warmup_steps", "reward_scale", "batch_size", "replay_size",
    "eval_rtg",
)  # fmt: skip
# The step budget of each phase: a resumed run cannot be given fewer steps than it has made.
PHASE_BUDGET = {"pretrain": "pretrain_steps", "finetune": "online_steps"}


def resolve_config(cfg: Config) -> Config:
    """Check every value and fill in the env's return-to-go targets; ConfigError if bad."""
    base, _ = parse_env_name(cfg.env)
    check_common(cfg)
    check(
        [
            (cfg.pretrain_steps >= 0, "pretrain_steps must be >= 0"),
            (cfg.online_steps >= 0, "online_steps must be >= 0"),
            (1 <= cfg.batch_size <= 1_000_000, "batch_size must be in [1, 1000000]"),
            (cfg.pretrain_eval_every >= 1, "pretrain_eval_every must be >= 1"),
            (1 <= cfg.random_dataset_steps <= 100_000_000, "random_dataset_steps must be in [1, 1e8]"),
            (1 <= cfg.context_length <= 1000, "context_length must be in [1, 1000]"),
            (
                1 <= cfg.eval_context_length <= cfg.context_length,
                "eval_context_length must be in [1, context_length]",
            ),
            (
                1 <= cfg.n_heads <= cfg.embed_dim <= 65536 and cfg.embed_dim % cfg.n_heads == 0,
                "embed_dim must be in [1, 65536] and a multiple of n_heads (>= 1)",
            ),
            (1 <= cfg.n_layers <= 1000, "n_layers must be in [1, 1000]"),
            (0 <= cfg.dropout < 1, "dropout must be in [0, 1)"),
            (0 < cfg.lr <= 1 and 0 < cfg.temperature_lr <= 1, "lr and temperature_lr must be in (0, 1]"),
            (cfg.weight_decay >= 0 and cfg.warmup_steps >= 1, "weight_decay must be >= 0 and warmup_steps >= 1"),
            (cfg.init_temperature > 0, "init_temperature must be > 0"),
            (cfg.reward_scale is None or cfg.reward_scale > 0, "reward_scale must be > 0"),
            (1 <= cfg.replay_size <= 1_000_000, "replay_size must be in [1, 1000000]"),
            (0 <= cfg.updates_per_iteration <= 1_000_000, "updates_per_iteration must be in [0, 1000000]"),
        ]
    )
    if cfg.reward_scale is None:  # the release's main.py: 1.0 if "antmaze" in the env name, else 0.001
        cfg = replace(cfg, reward_scale=1.0 if base == "antmaze" else 0.001)
    if cfg.eval_rtg is None or cfg.online_rtg is None:
        if base not in RTG_TARGETS:
            raise ConfigError(
                f"ODT has no published return-to-go targets for {base}; pass --eval-rtg and --online-rtg (known: {', '.join(RTG_TARGETS)})"
            )
        eval_rtg, online_rtg = RTG_TARGETS[base]
        cfg = replace(
            cfg,
            eval_rtg=eval_rtg if cfg.eval_rtg is None else cfg.eval_rtg,
            online_rtg=online_rtg if cfg.online_rtg is None else cfg.online_rtg,
        )
    return cfg


# ----------------------------------------------------------------------------------------------
# Method data: trajectories, state normalisation, trajectory replay, return-conditioned evaluation
# ----------------------------------------------------------------------------------------------
ACTION_BOUND = 1.0 - 1e-6  # actions are clamped to [-bound, bound]: their tanh-Gaussian log-likelihood stays finite


def split_trajectories(arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Flat transition arrays -> trajectories {observations, actions, rewards}, cut after every
    termination or truncation; rows after the last cut (an episode the dataset's budget ended) are
    the last trajectory."""
    n = len(arrays["rewards"])
    ends = np.union1d(np.flatnonzero((arrays["terminals"] > 0) | (arrays["timeouts"] > 0)) + 1, [n])
    starts = np.concatenate([[0], ends[:-1]])
    keys = ("observations", "actions", "rewards")
    return [{k: arrays[k][s:e] for k in keys} for s, e in zip(starts, ends)]


def state_normalisation(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (+1e-6) of every dataset state (release: over all states of the offline set)."""
    obs = arrays["observations"].astype(np.float64)
    return obs.mean(0).astype(np.float32), (obs.std(0) + 1e-6).astype(np.float32)


def trajectory_rows(obs, actions, rewards, stats: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
    """One trajectory -> rows [normalised state | clamped action | return-to-go]; the return-to-go of
    a step is the undiscounted sum of the rewards from it to the trajectory's end, i.e. of the
    rewards actually received (hindsight relabelling for online trajectories)."""
    rtg = np.cumsum(np.asarray(rewards, dtype=np.float64)[::-1])[::-1]
    columns = [
        (np.asarray(obs, dtype=np.float32) - stats[0]) / stats[1],
        np.clip(np.asarray(actions, dtype=np.float32), -ACTION_BOUND, ACTION_BOUND),
        rtg[:, None],
    ]
    return torch.from_numpy(np.concatenate(columns, axis=1).astype(np.float32))


def padding_row(stats: tuple[np.ndarray, np.ndarray], act_dim: int) -> torch.Tensor:
    """The row of left padding: the release pads states with 0 BEFORE normalising them (so -mean /
    std), actions and returns-to-go with 0."""
    return torch.from_numpy(np.concatenate([-stats[0] / stats[1], np.zeros(act_dim + 1, np.float32)]))


def ranked_trajectories(trajectories: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The pretraining set: trajectories sorted by return, ascending, without the lowest-return one
    (the release's _load_dataset keeps trajectories while their total length stays below the
    dataset's, which drops the last of the list sorted best first)."""
    ranked = sorted(trajectories, key=lambda t: float(t["rewards"].sum()))
    return ranked[1:] if len(ranked) > 1 else ranked


class TrajectoryReplay:
    """Whole trajectories (rows of trajectory_rows). Once `capacity` trajectories are held, a new
    one replaces the oldest slot (FIFO from slot 0, as the release's replay_buffer.py). Their rows
    are concatenated in one device tensor, rebuilt when the set changes (once per online episode),
    so a batch of segments is one gather."""

    def __init__(self, capacity: int, pad_row: torch.Tensor, device: torch.device):
        self.capacity, self.device = capacity, device
        self.pad_row = pad_row.to(device)  # the rows of left padding (the release's zero state, normalised)
        self.trajectories: list[torch.Tensor] = []
        self.next = 0  # the slot the next trajectory replaces once the replay is full
        self.rows: Optional[torch.Tensor] = None

    def add(self, rows: torch.Tensor) -> None:
        if len(self.trajectories) < self.capacity:
            self.trajectories.append(rows.to(self.device))
        else:
            self.trajectories[self.next] = rows.to(self.device)
            self.next = (self.next + 1) % self.capacity
        self.rows = None

    def index(self) -> None:
        self.rows = torch.cat(self.trajectories)
        self.lengths = torch.tensor([len(t) for t in self.trajectories], device=self.device)
        self.starts = torch.cumsum(self.lengths, 0) - self.lengths
        self.weights = self.lengths.float()

    def sample(self, batch_size: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Segments [batch, k, row] and their mask [batch, k] (1 = a real step): trajectories drawn
        with probability proportional to their length, a uniform start, up to k steps from it,
        left-padded to k (release: data.py)."""
        if self.rows is None:
            self.index()
        traj = torch.multinomial(self.weights, batch_size, replacement=True)
        length = self.lengths[traj]
        start = (torch.rand(batch_size, device=self.device) * length).long()
        steps = torch.clamp(length - start, max=k)
        offset = torch.arange(k, device=self.device) - (k - steps)[:, None]  # < 0: padding
        mask = offset >= 0
        rows = self.rows[(self.starts[traj] + start)[:, None] + offset.clamp(min=0)]
        return torch.where(mask[..., None], rows, self.pad_row), mask.float()

    def seeded(self, capacity: int) -> TrajectoryReplay:
        """The online replay: a new one of `capacity` holding this set's highest-return trajectories,
        ascending (the set is ranked), so that FIFO replaces the worst of them first."""
        replay = TrajectoryReplay(capacity, self.pad_row, self.device)
        for rows in self.trajectories[-capacity:]:
            replay.add(rows)
        return replay

    def state_dict(self) -> dict:
        return {"trajectories": [t.cpu() for t in self.trajectories], "next": self.next}

    def load_state_dict(self, state: dict) -> None:
        self.trajectories = [t.to(self.device) for t in state["trajectories"]]
        self.next, self.rows = state["next"], None


# ODT has no Q function: the Q diagnostics of the other files do not apply and are null.
NO_Q = dict.fromkeys(("q_true", "q_bias", "q_bias_min", "kendall_tau", "q_std_policy", "q_std_random"))


class Window:
    """The last steps of n running episodes as the policy reads them (release: get_action):
    normalised states, the actions taken (0 at the current step, which the state token does not
    see), the returns-to-go (the target minus the rewards so far, scaled), left-padded to K."""

    def __init__(self, n: int, obs_dim: int, act_dim: int, cfg: Config, stats, target: float, device: torch.device):
        length = cfg.eval_context_length
        self.k, self.stats, self.scale, self.device = cfg.context_length, stats, cfg.reward_scale, device
        self.obs = np.zeros((n, length, obs_dim), np.float32)
        self.act = np.zeros((n, length, act_dim), np.float32)
        self.rtg = np.zeros((n, length), np.float32)
        self.next_rtg = np.full(n, target * cfg.reward_scale, np.float64)
        self.steps = 0

    def observe(self, obs: np.ndarray) -> None:
        """A new step of every episode: its state enters the window, the oldest step leaves."""
        for array in (self.obs, self.act, self.rtg):
            array[:, :-1] = array[:, 1:].copy()
        self.obs[:, -1] = (obs - self.stats[0]) / self.stats[1]
        self.act[:, -1] = 0.0
        self.rtg[:, -1] = self.next_rtg
        self.steps += 1

    def record(self, rows: list[int], actions: np.ndarray, rewards: np.ndarray) -> None:
        self.act[rows, -1] = actions
        self.next_rtg[rows] -= np.asarray(rewards) * self.scale

    def inputs(self, rows: list[int]) -> tuple[torch.Tensor, ...]:
        """(rtg [r, K, 1], obs [r, K, S], act [r, K, A], mask [r, K]) of the episodes in rows."""
        filled, length = min(self.steps, self.obs.shape[1]), self.obs.shape[1]
        pad = self.k - length

        def padded(array: np.ndarray) -> torch.Tensor:
            x = torch.as_tensor(array[rows]).to(self.device)
            return nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (pad, 0))

        mask = torch.zeros(len(rows), self.k, device=self.device)
        mask[:, self.k - filled :] = 1.0
        return padded(self.rtg[..., None]), padded(self.obs), padded(self.act), mask


class Evaluator:
    """Runs one episode per env in `envs` together (one batched deterministic policy forward per
    step), conditioned on the evaluation return-to-go target, and returns the normalised score.
    Every evaluation starts from the same seeded initial states, so scores compare across
    evaluations and runs; it draws nothing from the training RNG."""

    def __init__(self, base: str, envs: list[gym.Env], cfg: Config, device: torch.device, stats):
        self.base, self.envs, self.cfg, self.device, self.stats = base, envs, cfg, device, stats
        self.seeds = [cfg.seed * 1000 + 500 + i for i in range(len(envs))]

    def __call__(self, agent: ODTAgent) -> dict[str, float]:
        obs = np.stack([env.reset(seed=s)[0] for env, s in zip(self.envs, self.seeds)]).astype(np.float32)
        act_dim = self.envs[0].action_space.shape[0]
        window = Window(len(self.envs), obs.shape[1], act_dim, self.cfg, self.stats, self.cfg.eval_rtg, self.device)
        returns, lengths = np.zeros(len(self.envs)), np.zeros(len(self.envs))
        active = list(range(len(self.envs)))
        while active:
            window.observe(obs)
            actions = agent.act(*window.inputs(active), deterministic=True).cpu().numpy()
            still, rewards = [], []
            for i, action in zip(active, actions):
                next_obs, reward, terminated, truncated, _ = self.envs[i].step(action)
                returns[i] += reward
                lengths[i] += 1
                rewards.append(reward)
                obs[i] = next_obs
                if not (terminated or truncated):
                    still.append(i)
            window.record(active, actions, np.array(rewards))
            active = still
        return {
            "return": float(returns.mean()),
            "return_std": float(returns.std()),
            "episode_length": float(lengths.mean()),
            "normalized_score": float(normalized_score(self.base, returns).mean()),
            **NO_Q,
        }


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
class Block(nn.Module):
    """A GPT-2 block: pre-LayerNorm causal self-attention and a ReLU MLP (4x wide), each a
    residual branch ending in dropout; attention weights get dropout too."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))
        self.attn_dropout, self.resid_dropout = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, future: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """future [T, T] True where a key comes after its query; padding [B, 1, 1, T] -1e4 at padded
        keys, 0 elsewhere. As the release's GPT-2: scores of future keys are REPLACED by -1e4, then
        the padding term is added (so a padded query, with no real key before it, attends to its
        padded past and to future real keys alike; real queries see neither)."""
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(c // self.heads)
        weights = torch.softmax(scores.masked_fill(future, -1e4) + padding, dim=-1)
        y = self.attn_dropout(weights) @ v
        x = x + self.resid_dropout(self.proj(y.transpose(1, 2).reshape(b, t, c)))
        return x + self.mlp(self.ln_2(x))


class DecisionTransformer(nn.Module):
    """(return-to-go, state, action) per step -> tokens R_1, s_1, a_1, R_2, ... -> a causal GPT-2 ->
    the action distribution read at each STATE token (it sees the returns-to-go and states up to
    its step and the actions before it). No timestep or position embedding (the release's
    default). Output: the pre-tanh mean and the log-std squashed into LOG_STD_RANGE."""

    def __init__(self, obs_dim: int, act_dim: int, cfg: Config):
        super().__init__()
        dim = cfg.embed_dim
        self.embed_return, self.embed_state = nn.Linear(1, dim), nn.Linear(obs_dim, dim)
        self.embed_action, self.embed_ln = nn.Linear(act_dim, dim), nn.LayerNorm(dim)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(dim, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(dim)
        for module in [*self.blocks.modules(), self.ln_f]:  # GPT-2's init, inside the transformer only
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.mu, self.log_std = nn.Linear(dim, act_dim), nn.Linear(dim, act_dim)
        for head in (self.mu, self.log_std):  # release: DiagGaussianActor's orthogonal init
            nn.init.orthogonal_(head.weight)
            nn.init.zeros_(head.bias)
        tokens = 3 * cfg.context_length
        future = torch.triu(torch.ones(tokens, tokens, dtype=torch.bool), diagonal=1)
        self.register_buffer("future", future, persistent=False)

    def forward(self, rtg: torch.Tensor, obs: torch.Tensor, act: torch.Tensor, mask: torch.Tensor):
        """rtg [B, K, 1] (scaled), obs [B, K, S] (normalised), act [B, K, A], mask [B, K] (1 = real
        step) -> (mu, log_std), each [B, K, A]."""
        b, k = mask.shape
        tokens = torch.stack([self.embed_return(rtg), self.embed_state(obs), self.embed_action(act)], dim=2)
        x = self.embed_dropout(self.embed_ln(tokens.reshape(b, 3 * k, -1)))
        padding = (mask.repeat_interleave(3, dim=1) - 1)[:, None, None, :] * 1e4
        for block in self.blocks:
            x = block(x, self.future[: 3 * k, : 3 * k], padding)
        x = self.ln_f(x).reshape(b, k, 3, -1)[:, :, 1]
        low, high = LOG_STD_RANGE
        return self.mu(x), low + 0.5 * (high - low) * (torch.tanh(self.log_std(x)) + 1)


# ----------------------------------------------------------------------------------------------
# Losses and updates: ODT (likelihood of the actions + entropy bonus with an adjusted temperature)
# ----------------------------------------------------------------------------------------------
def squashed_log_prob(mu: torch.Tensor, std: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """log density of tanh(u) for u ~ N(mu, std), summed over the last dim:
    log N(u; mu, std) - log|d tanh(u)/du|, with log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))."""
    log_normal = -0.5 * ((u - mu) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return (log_normal - 2 * (math.log(2) - u - nn.functional.softplus(-2 * u))).sum(-1)


def action_log_likelihood(mu: torch.Tensor, log_std: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """log pi(a) of actions in (-1, 1) (clamped to ACTION_BOUND, so atanh is finite), per step."""
    return squashed_log_prob(mu, log_std.exp(), 0.5 * (torch.log1p(action) - torch.log1p(-action)))


def sampled_entropy(mu: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """One-sample estimate -log pi(a), a = tanh(mu + std eps), per step; differentiable (release:
    SquashedNormal.entropy(N=1))."""
    std = log_std.exp()
    return -squashed_log_prob(mu, std, mu + std * torch.randn_like(mu))


def odt_loss(mu, log_std, actions, mask, temperature) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, nll, entropy): loss = nll - temperature x entropy, nll the mean negative log-likelihood
    over REAL steps, entropy the mean over ALL steps, padding included (release: main.py's loss_fn)."""
    nll = -(action_log_likelihood(mu, log_std, actions) * mask).sum() / mask.sum()
    entropy = sampled_entropy(mu, log_std).mean()
    return nll - temperature.detach() * entropy, nll, entropy


def warmup_factor(update: int, warmup_steps: int) -> float:
    """Learning-rate factor of the update that follows `update` earlier ones (release: LambdaLR with
    min((step + 1) / warmup_steps, 1), stepped after each update)."""
    return min((update + 1) / warmup_steps, 1.0)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2020) as the release's lamb.py sets it up: Adam moments with bias correction,
    update u = m_hat / (sqrt(v_hat) + eps) + weight_decay * w, scaled by the trust ratio
    ||w|| / ||u|| (1 when either norm is 0), then w <- w - lr * ratio * u, for every parameter.
    With weight_decay 0 there is no trust ratio (lamb.py adapts only with decay): bias-corrected
    Adam. Written with torch's foreach ops: one kernel per operation over all parameters."""

    def __init__(self, params, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps, "step": 0})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            group["step"] += 1
            (beta1, beta2), t = group["betas"], group["step"]
            grads = [p.grad for p in params]
            m = [self.state[p]["exp_avg"] for p in params]
            v = [self.state[p]["exp_avg_sq"] for p in params]
            torch._foreach_lerp_(m, grads, 1 - beta1)  # m <- beta1 m + (1 - beta1) g
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            denominators = torch._foreach_add(
                torch._foreach_div(torch._foreach_sqrt(v), math.sqrt(1 - beta2**t)), group["eps"]
            )
            updates = torch._foreach_div(torch._foreach_div(m, 1 - beta1**t), denominators)
            if group["weight_decay"] == 0:
                torch._foreach_add_(params, updates, alpha=-group["lr"])
                continue
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])
            w_norm, u_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(updates))
            ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
            torch._foreach_mul_(updates, list((-group["lr"] * ratio).unbind()))
            torch._foreach_add_(params, updates)


class ODTAgent:
    """The decision transformer (LAMB with warm-up) and the log-temperature (Adam). update() is one
    step of both; act() one rollout step."""

    def __init__(self, obs_dim: int, act_dim: int, cfg: Config, device: torch.device):
        self.cfg, self.obs_dim = cfg, obs_dim
        self.actor = DecisionTransformer(obs_dim, act_dim, cfg).to(device)
        self.actor_optim = Lamb(self.actor.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.log_temperature = torch.tensor(math.log(cfg.init_temperature), device=device, requires_grad=True)
        self.temperature_optim = torch.optim.Adam([self.log_temperature], lr=cfg.temperature_lr)
        self.target_entropy = -act_dim if cfg.target_entropy is None else cfg.target_entropy
        self.updates = 0  # across both phases: the warm-up runs on into finetuning, as in the release

    def inputs(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows [..., state | action | return-to-go] -> (scaled return-to-go [..., 1], state, action)."""
        obs, act, rtg = rows[..., : self.obs_dim], rows[..., self.obs_dim : -1], rows[..., -1:]
        return rtg * self.cfg.reward_scale, obs, act

    def update(self, rows: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        rtg, obs, act = self.inputs(rows)
        self.actor.train()
        mu, log_std = self.actor(rtg, obs, act, mask)
        temperature = self.log_temperature.exp()
        loss, nll, entropy = odt_loss(mu, log_std, act, mask, temperature)
        lr = self.cfg.lr * warmup_factor(self.updates, self.cfg.warmup_steps)
        self.actor_optim.param_groups[0]["lr"] = lr
        self.actor_optim.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.actor.parameters(), GRAD_CLIP)
        self.actor_optim.step()
        temperature_loss = temperature * (entropy - self.target_entropy).detach()
        self.temperature_optim.zero_grad(set_to_none=True)
        temperature_loss.backward()
        self.temperature_optim.step()
        self.updates += 1
        return {
            "actor_loss": loss.detach(),
            "alpha": temperature.detach(),
            "nll": nll.detach(),
            "entropy": entropy.detach(),
            "temperature_loss": temperature_loss.detach(),
            "lr": lr,
        }

    @torch.no_grad()
    def act(self, rtg, obs, act, mask, deterministic: bool) -> torch.Tensor:
        """The action at the last position: tanh(mu) when deterministic, else a sample; dropout off
        (release: model.eval() in rollouts)."""
        self.actor.eval()
        mu, log_std = self.actor(rtg, obs, act, mask)
        mu, log_std = mu[:, -1], log_std[:, -1]
        pre_tanh = mu if deterministic else mu + log_std.exp() * torch.randn_like(mu)
        return torch.tanh(pre_tanh).clamp(-ACTION_BOUND, ACTION_BOUND)

    def state_dict(self) -> dict:
        return {
            "actor": self.actor.state_dict(),
            "actor_optim": self.actor_optim.state_dict(),
            "log_temperature": self.log_temperature.detach().clone(),
            "temperature_optim": self.temperature_optim.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.actor_optim.load_state_dict(state["actor_optim"])
        with torch.no_grad():
            self.log_temperature.copy_(state["log_temperature"])
        self.temperature_optim.load_state_dict(state["temperature_optim"])
        self.updates = state["updates"]


# ----------------------------------------------------------------------------------------------
# Train loop
# ----------------------------------------------------------------------------------------------
def losses_record(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in losses.items()}


def pretrain(run: Run, offline: TrajectoryReplay, step: int) -> None:
    """Updates step+1 .. pretrain_steps on segments of the pretraining set."""
    cfg, agent = run.cfg, run.agent
    progress = tqdm(
        range(step + 1, cfg.pretrain_steps + 1),
        desc="pretrain (ODT)",
        unit="upd",
        mininterval=1,
        initial=step,
        total=cfg.pretrain_steps,
    )
    for step in progress:
        losses = agent.update(*offline.sample(cfg.batch_size, cfg.context_length))
        run.watch(losses)
        if step % cfg.pretrain_eval_every == 0 or step == cfg.pretrain_steps:
            run.check("pretrain", step)
            record = {"phase": "pretrain", "step": step, "env_steps": 0, **run.evaluate(agent), **losses_record(losses)}
            run.write(record)
            progress.set_postfix(score=f"{record['normalized_score']:.1f}")
        if run.stop.signum is not None or step % cfg.checkpoint_every == 0:
            run.save("checkpoint", "pretrain", step, {})
        if run.stop.signum is not None:
            raise Stopped
    progress.close()


def finetune(run: Run, offline: TrajectoryReplay, stats, step: int, loop: Optional[dict]) -> None:
    """Online env steps step+1 .. online_steps in iterations: one episode with the sampled policy
    and the online target, stored with its hindsight returns-to-go, then updates_per_iteration
    updates on the replay. loop (None at the start) holds the replay, the env, the counters, the
    updates still owed by the last episode and the last losses; checkpoints fall between episodes."""
    cfg, agent, device = run.cfg, run.agent, run.device
    env = make_env(parse_env_name(cfg.env)[0], run.dataset["id"])
    env.reset(seed=cfg.seed)  # seeds the env's RNG; every episode starts with a reset
    if loop is None:
        replay = offline.seeded(cfg.replay_size)
        updates, owed, losses, saved_at = 0, 0, {}, 0
        run.check("finetune", 0)
        run.write({"phase": "finetune", "step": 0, "env_steps": 0, **run.evaluate(agent)})
    else:
        replay = TrajectoryReplay(cfg.replay_size, offline.pad_row, device)
        replay.load_state_dict(loop["replay"])
        restore_env_state(env, loop["env"])
        updates, owed, losses, saved_at = loop["updates"], loop["owed"], dict(loop["losses"]), step
    progress = tqdm(
        total=cfg.online_steps, initial=step, desc="finetune (ODT)", unit="env step", mininterval=1, smoothing=0.1
    )
    env_step = step

    def checkpoint() -> None:
        nonlocal saved_at
        loop = {
            "replay": replay.state_dict(),
            "env": env_state(env),
            "updates": updates,
            "owed": owed,
            "losses": losses,
        }
        run.save("checkpoint", "finetune", env_step, loop)
        saved_at = env_step

    while True:
        while owed > 0:  # the updates of the last episode; a signal stops after any of them
            losses = agent.update(*replay.sample(cfg.batch_size, cfg.context_length))
            run.watch(losses)
            updates, owed = updates + 1, owed - 1
            if run.stop.signum is not None:
                checkpoint()
                raise Stopped
        done = env_step >= cfg.online_steps
        if run.stop.signum is not None or done or env_step // cfg.checkpoint_every > saved_at // cfg.checkpoint_every:
            checkpoint()
        if run.stop.signum is not None:
            raise Stopped
        if done:
            break
        # One episode (a signal lets it finish: at most the env's time limit of steps).
        obs, _ = env.reset()
        window = Window(1, run.obs_dim, run.act_dim, cfg, stats, cfg.online_rtg, device)
        episode = {"obs": [], "act": [], "rew": []}
        while True:
            window.observe(obs[None])
            action = agent.act(*window.inputs([0]), deterministic=False)[0].cpu().numpy()
            next_obs, reward, terminated, truncated, _ = env.step(action)
            window.record([0], action[None], np.array([reward]))
            for key, value in zip(("obs", "act", "rew"), (obs, action, reward)):
                episode[key].append(value)
            obs, env_step = next_obs, env_step + 1
            progress.update(1)
            if env_step % cfg.eval_every == 0 or env_step == cfg.online_steps:
                run.check("finetune", env_step)
                record = {
                    "phase": "finetune",
                    "step": updates,
                    "env_steps": env_step,
                    **run.evaluate(agent),
                    **losses_record(losses),
                }
                run.write(record)
                progress.set_postfix(score=f"{record['normalized_score']:.1f}")
            if terminated or truncated or env_step == cfg.online_steps:
                break
        if env_step < cfg.online_steps:  # the episode that reaches the budget ends the run
            replay.add(trajectory_rows(episode["obs"], episode["act"], episode["rew"], stats))
            owed = cfg.updates_per_iteration
    progress.close()


def time_phases(run: Run, phase: str, step: int, offline: TrajectoryReplay) -> list[tuple[str, int, float]]:
    """(phase, updates left, seconds per update) of the rest of the run, from updates timed on a
    copy of the agent with random segments. Finetuning's update count is a guess: online episodes
    as long as the replay's seed trajectories."""
    cfg, agent = run.cfg, copy.deepcopy(run.agent)
    fixed = torch.Generator(run.device).manual_seed(0)  # the rows must not draw from the run's RNG
    rows = torch.rand(
        cfg.batch_size, cfg.context_length, run.obs_dim + run.act_dim + 1, device=run.device, generator=fixed
    )
    mask = torch.ones(cfg.batch_size, cfg.context_length, device=run.device)
    seconds = seconds_per_call(lambda: agent.update(rows, mask), run.device, 3)
    parts = []
    if phase == "pretrain" and cfg.pretrain_steps > step:
        parts.append(("pretraining", cfg.pretrain_steps - step, seconds))
    left = cfg.online_steps - (step if phase == "finetune" else 0)
    if left > 0 and cfg.updates_per_iteration > 0:
        episode = float(np.mean([len(t) for t in offline.trajectories[-cfg.replay_size :]]))
        iterations = math.ceil(left / episode)
        parts.append(
            (
                f"finetuning (~{iterations:,} episodes of ~{episode:.0f} steps, as the replay's)",
                iterations * cfg.updates_per_iteration,
                seconds,
            )
        )
    return parts


def read_pretrained(cfg: Config) -> dict:
    """A finished pretraining (pretrain.pt) that fits this run; ConfigError otherwise."""
    saved = read_saved(Path(cfg.pretrained), "pretrain")
    config = saved["config"]
    if config["env"] != cfg.env or config["random_dataset_steps"] != cfg.random_dataset_steps:
        raise ConfigError(
            f"checkpoint '{cfg.pretrained}' was pretrained on {config['env']} ({config['random_dataset_steps']} random steps), not {cfg.env} ({cfg.random_dataset_steps}); its state normalisation would not fit"
        )
    sizes = ("context_length", "embed_dim", "n_layers", "n_heads")
    if any(config[name] != getattr(cfg, name) for name in sizes):
        raise ConfigError(
            f"checkpoint '{cfg.pretrained}' has {', '.join(f'{n}={config[n]}' for n in sizes)}; this run has {', '.join(f'{n}={getattr(cfg, n)}' for n in sizes)}"
        )
    return saved


def train(cfg: Config, checkpoint: Optional[dict]) -> Path:
    """A new run (checkpoint None) or the continuation of a checkpointed one, to its end."""
    base, quality = parse_env_name(cfg.env)
    pretrained = read_pretrained(cfg) if cfg.pretrained is not None and checkpoint is None else None
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    arrays, dataset_id = load_dataset(base, quality, cfg.random_dataset_steps)
    obs_dim, act_dim = arrays["observations"].shape[1], arrays["actions"].shape[1]
    data_info = {"id": dataset_id, "fingerprint": dataset_fingerprint(arrays)}
    if checkpoint is not None and checkpoint["dataset"] != data_info:
        raise ConfigError(
            f"--resume: dataset {dataset_id} on disk is not the one the run started with ({checkpoint['dataset']['fingerprint']}, now {data_info['fingerprint']})"
        )

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    stats = state_normalisation(arrays)
    evaluate = Evaluator(base, [make_env(base, dataset_id) for _ in range(cfg.eval_episodes)], cfg, device, stats)
    agent = ODTAgent(obs_dim, act_dim, cfg, device)
    if pretrained is not None:
        agent.load_state_dict(pretrained["agent"])
    first = ("pretrain", {}) if pretrained is None else ("finetune", None)
    with open_run(cfg, checkpoint, agent, evaluate, device, data_info, first) as (run, phase, step, loop):
        offline = TrajectoryReplay(1 << 62, padding_row(stats, act_dim), device)  # the pretraining set: no capacity
        trajectories = ranked_trajectories(split_trajectories(arrays))
        for t in trajectories:
            offline.add(trajectory_rows(t["observations"], t["actions"], t["rewards"], stats))
        print(
            f"run {run.dir}: dataset {dataset_id} ({len(arrays['rewards'])} transitions, {len(trajectories)} trajectories in the pretraining set), ODT, device {device}, {phase} from step {step}",
            file=sys.stderr,
        )
        print(
            f"{ALGO}.py: ODT has no Q function: the Q diagnostics (q_bias, kendall_tau, q_std_*) do not apply and are null in metrics.jsonl",
            file=sys.stderr,
        )
        announce_time(time_phases(run, phase, step, offline))
        if phase == "pretrain":
            pretrain(run, offline, step)
            step, loop = run.end_pretraining()
        if cfg.online_steps > 0:
            finetune(run, offline, stats, step, loop)
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
LOCOMOTION_QUALITIES = ("random", "medium", "medium-replay", "medium-expert", "expert")  # made by make_dataset.py
# Adroit: random and medium made here by make_dataset.py (medium: a sac.py policy of results/policies);
# human, cloned and expert on the Minari hub only.
ADROIT_QUALITIES = ("random", "medium", "human", "cloned", "expert")
# AntMaze: one base, the maze and its data in the quality; the environment comes from the dataset.
# The hub's six sets, then umaze-random: random actions in umaze, made by make_dataset.py (offline).
ANTMAZE_QUALITIES = (
    *("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse"),
    "umaze-random",
)
GENERATED = ("random", "umaze-random")  # the qualities a run makes with make_dataset.py when missing


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
# Datasets: D4RL names -> Minari datasets -> flat transition arrays (cached)
# ----------------------------------------------------------------------------------------------


def parse_env_name(name: str) -> tuple[str, str]:
    """'walker2d-medium-replay' -> ('walker2d', 'medium-replay'); ConfigError if unknown."""
    base, _, quality = name.partition("-")
    qualities = ANTMAZE_QUALITIES if base == "antmaze" else ADROIT_QUALITIES if base in ADROIT else LOCOMOTION_QUALITIES
    if base not in ENVS or quality not in qualities:
        locomotion = ",".join(b for b in ENVS if b not in ADROIT and b != "antmaze")
        raise ConfigError(
            f"unknown env '{name}'; expected {{{locomotion}}}-{{{','.join(LOCOMOTION_QUALITIES)}}}, "
            f"{{{','.join(ADROIT)}}}-{{{','.join(ADROIT_QUALITIES)}}} or antmaze-{{{','.join(ANTMAZE_QUALITIES)}}}"
        )
    return base, quality


def dataset_ids(base: str, quality: str, random_steps: int) -> tuple[str, list[str]]:
    """(local id, hub ids) tried in that order. The hub has no random, medium-replay or
    medium-expert locomotion sets; its medium/expert sets come from other policies than D4RL's."""
    name = quality if quality not in GENERATED or random_steps == 1_000_000 else f"{quality}-n{random_steps}"
    local = f"local/{base}/{name}-v0"
    if quality in GENERATED:  # made here only
        return local, []
    if base in ADROIT:
        return local, [] if quality == "medium" else [f"D4RL/{base}/{quality}-v2"]
    if base == "antmaze":
        return local, [f"D4RL/antmaze/{quality}-v1"]
    return local, [f"mujoco/{base}/{quality}-v0"] if quality in ("medium", "expert") else []


def flatten_episodes(episodes) -> dict[str, np.ndarray]:
    """Episodes (observations with T+1 rows, actions/rewards/terminations/truncations with T) ->
    float32 transition arrays in D4RL's q-learning layout. terminals = terminations only: a
    time-limit truncation is not a terminal state, and observations[t + 1] is the real next state
    even at a truncation; timeouts marks truncations, so episode boundaries stay recoverable."""
    columns = zip(
        *((e["observations"], e["actions"], e["rewards"], e["terminations"], e["truncations"]) for e in episodes)
    )
    obs, actions, rewards, terminals, timeouts = (list(c) for c in columns)
    arrays = {"observations": [o[:-1] for o in obs], "actions": actions, "rewards": rewards}
    arrays |= {"next_observations": [o[1:] for o in obs], "terminals": terminals, "timeouts": timeouts}
    return {k: np.concatenate(v).astype(np.float32) for k, v in arrays.items()}


def dataset_path(dataset_id: str = "") -> Path:
    """Minari's folder of a dataset ($MINARI_DATASETS_PATH, default ~/.minari/datasets), without
    creating anything, so that a read-only store can be read."""
    return Path(os.environ.get("MINARI_DATASETS_PATH") or Path.home() / ".minari" / "datasets") / dataset_id


def cache_key(dataset_id: str) -> str:
    """flat_cache.npz belongs to the dataset file of this size and modification time (v2: AntMaze
    goal steps are terminals)."""
    stat = (dataset_path(dataset_id) / "data" / "main_data.hdf5").stat()
    return f"flat-v2:{dataset_id}:{stat.st_size}:{stat.st_mtime_ns}"


def save_flat_cache(dataset_id: str, arrays: dict[str, np.ndarray]) -> None:
    with contextlib.suppress(OSError):  # a read-only store only costs the next load its flattening time
        key = np.array(cache_key(dataset_id))
        atomic_write(dataset_path(dataset_id) / "flat_cache.npz", lambda f: np.savez(f, key=key, **arrays))


def read_flat_cache(dataset_id: str) -> Optional[dict[str, np.ndarray]]:
    """The cached arrays, or None when the cache is missing, stale or unreadable (a cache miss)."""
    with contextlib.suppress(Exception), np.load(dataset_path(dataset_id) / "flat_cache.npz") as cache:
        return {k: cache[k] for k in cache.files if k != "key"} if str(cache["key"]) == cache_key(dataset_id) else None


def flat_observations(observations) -> np.ndarray:
    """Dict observations (AntMaze: observation, achieved_goal, desired_goal) -> one array in sorted
    key order, the order gymnasium's FlattenObservation uses for the evaluation env."""
    if isinstance(observations, dict):
        return np.concatenate([observations[k] for k in sorted(observations)], axis=-1)
    return observations


def build_flat_cache(dataset_id: str, base: str) -> dict[str, np.ndarray]:
    import minari

    dataset = minari.load_dataset(dataset_id)
    goal = base == "antmaze"  # a step with reward 1 reaches the goal, where D4RL's episodes end
    episodes = (
        {
            "observations": flat_observations(e.observations),
            "actions": e.actions,
            "rewards": e.rewards,
            "terminations": e.terminations | (goal & (e.rewards > 0)),
            "truncations": e.truncations & ~(goal & (e.rewards > 0)),
        }
        for e in dataset.iterate_episodes()
    )
    arrays = flatten_episodes(episodes)
    save_flat_cache(dataset_id, arrays)
    return arrays


def load_dataset(base: str, quality: str, random_steps: int) -> tuple[dict[str, np.ndarray], str]:
    """Flat transition arrays and the Minari id they came from. Order: local/<env>/<quality>-v0,
    then the hub id on disk, then for *-random a set made here by scripts/make_dataset.py (no
    network needed; the script locks the id, so concurrent first runs make it once), then a
    download (needs the network). A damaged dataset is a ConfigError that says how to make it again."""
    root = dataset_path()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"MINARI_DATASETS_PATH '{root}' is a file, not a folder")
    local_id, hub_ids = dataset_ids(base, quality, random_steps)
    on_disk = [i for i in [local_id, *hub_ids] if (dataset_path(i) / "data").exists()]
    size = f" --steps {random_steps}" if quality in GENERATED else ""  # the size this run looks for
    if not on_disk and quality in GENERATED:
        make = f"scripts/make_dataset.py {base}-{quality}{size}"
        print(f"{ALGO}.py: {base}-{quality} is not on disk; generating it: python {make}", file=sys.stderr)
        code = subprocess.run([sys.executable, str(REPO_ROOT / make.split()[0]), *make.split()[1:]]).returncode
        if code in (2, 130, 143):  # bad input or a signal: the script has said why in one line
            sys.exit(code)
        if code != 0:
            raise ConfigError(f"generating {base}-{quality} failed (exit code {code}); see its output above")
        on_disk = [local_id]
    if not on_disk:
        on_disk = [download_dataset(base, quality, local_id, hub_ids)]
    dataset_id = on_disk[0]
    remedy = f"delete {dataset_path(dataset_id)} and " + (
        f"make it again with: python scripts/make_dataset.py {base}-{quality}{size}"
        if dataset_id == local_id
        else "run again to download it"
    )
    if not (dataset_path(dataset_id) / "data" / "main_data.hdf5").is_file():
        raise ConfigError(f"dataset {dataset_id} is damaged (data/main_data.hdf5 is missing); {remedy}")
    arrays = read_flat_cache(dataset_id)
    if arrays is None:
        try:
            arrays = build_flat_cache(dataset_id, base)
        except Exception as exc:  # h5py / minari errors of a truncated or corrupt file
            raise ConfigError(f"dataset {dataset_id} is damaged ({first_line(exc)}); {remedy}")
    return arrays, dataset_id


def download_dataset(base: str, quality: str, local_id: str, hub_ids: list[str]) -> str:
    """Minari's download of the first hub id that works; ConfigError naming the way to make the
    dataset offline. Without a network the hub's name does not resolve: that fails at once,
    where the download itself would retry for ~25 s."""
    import socket

    import minari

    errors = []
    for hub_id in hub_ids:
        try:
            socket.getaddrinfo("huggingface.co", 443)
            minari.download_dataset(hub_id)
            return hub_id
        except Exception as exc:  # no network, missing hf extra, id gone: all mean "unavailable"
            errors.append(f"{hub_id}: {first_line(exc)}")
    tried = f"; download failed ({'; '.join(errors)})" if errors else " and the Minari hub has no such dataset"
    hub_only = hub_ids and base in (*ADROIT, "antmaze")  # Adroit's human/cloned/expert, AntMaze
    make = "" if hub_only else f"; generate it with: python scripts/make_dataset.py {base}-{quality}"
    raise ConfigError(
        f"dataset '{base}-{quality}' is not on disk (looked for {', '.join([local_id, *hub_ids])}){tried}. It is unavailable offline{make}"
    )


def dataset_fingerprint(arrays: dict[str, np.ndarray]) -> str:
    """Content hash of the flat dataset arrays: a resumed run checks that it reloaded the same data
    (the checkpoint does not copy the dataset)."""
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(arrays):
        digest.update(key.encode() + np.ascontiguousarray(arrays[key]).tobytes())
    return f"{len(arrays['rewards'])} transitions, blake2b {digest.hexdigest()}"


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
