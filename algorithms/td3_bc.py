"""TD3+BC: offline pretraining, then online finetuning, with optional SERA rewards.

Papers: Fujimoto & Gu, "A Minimalist Approach to Offline Reinforcement Learning", NeurIPS 2021
(TD3+BC, arXiv 2106.06860, code sfujim/TD3_BC); Fujimoto et al., "Addressing Function
Approximation Error in Actor-Critic Methods", ICML 2018 (TD3); Zhang et al., "Improving
Offline-to-Online Reinforcement Learning with Q Conditioned State Entropy Exploration" (SERA,
arXiv 2310.19805).
Pipeline in this file, top to bottom:
  1. the D4RL-style dataset, resolved to a Minari dataset (generated on the spot for *-random by
     scripts/make_dataset.py); states are normalised with the dataset's mean and std, which stay
     fixed online (they are buffers of the networks, so checkpoints and pretrain.pt carry them);
  2. offline pretraining: TD3 with target policy smoothing and a delayed actor whose loss is
     -lambda Q1(s, pi(s)) + (pi(s) - a)^2, lambda = alpha / mean|Q1(s, pi(s))| (detached);
  3. online finetuning: the deterministic policy plus Gaussian exploration noise acts, every env
     step is stored and followed by one update on a batch mixed from the dataset and the online
     buffer; the BC term stays on (the default, the SO2 paper's "original" TD3+BC) or is dropped
     with --loose (plain TD3, the SO2 paper's "loose" variant); optionally SERA's Q-conditioned
     state-entropy reward (--sera, the same semantics and flags as algorithms/cal_ql.py);
  4. batched deterministic evaluation with the same Q diagnostics as algorithms/so2.py (the twin
     critics give the Q spread).
The run folder (checkpoint, --resume, signals, divergence) is the same in every algorithm file.

Defaults follow the released offline code (sfujim/TD3_BC): alpha 2.5, policy noise 0.2 clipped at
0.5, policy delay 2 (the targets move with the actor), 2x256 networks with nn.Linear's default
initialisation, Adam 3e-4, batch 256, 1M offline steps, state normalisation with std + 1e-3,
evaluation on 10 episodes every 5,000 steps; the online budget is the SO2 paper's 100k env steps
(TD3+BC itself was offline only).
Deliberate differences and choices where no released code exists:
  - there is no released TD3+BC finetuning code (the SO2 paper ran DI-engine's). The batch follows
    the closest released online TD3+BC, BOORL (YiqinYang/BOORL): half dataset rows, half online
    rows (`mixing_ratio` 0.5). The rest is this file's choice, not BOORL's (BOORL runs 5 critic
    updates per env step after a 25k-step warm-up and drops the BC term): one update per env
    step, TD3's exploration noise N(0, 0.1), updates from the moment the online buffer holds one
    online half-batch (128 env steps at the defaults, so no batch repeats one transition), and the
    policy-delay counter running on from pretraining.
  - the dataset's actions are not clipped; the actor outputs tanh(.) in [-1, 1] (max_action 1).
  - the twin critics are one vectorised module (one batched matmul per layer).
  - environments are gymnasium v5 MuJoCo and Minari datasets (the paper used D4RL on
    gym/mujoco-py). Adroit names are accepted with the locomotion values (no published TD3+BC
    values for them).
SERA: the same rule and choices as algorithms/cal_ql.py (applied online to the online rows of each
batch; q = min over the twin of the critic frozen at the end of pretraining; see sera_reward).
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

ALGO = "td3_bc"
FIRST_RESULT = "For a first result on a CPU, shrink the budgets, e.g. --pretrain-steps 20000 --online-steps 10000"
REPO_ROOT = Path(__file__).resolve().parent.parent
NUM_CRITICS = 2  # TD3's twin critics (min over the twin in the target; Q1 alone in the actor loss)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclass
class Config:
    env: str = "hopper-random"
    """D4RL-style dataset name: {halfcheetah,hopper,walker2d,ant}-{random,medium,medium-replay,
    medium-expert,expert}, {pen,door}-{random,medium,human,cloned,expert} or antmaze-<maze> (README)."""
    config: Optional[str] = None
    """YAML file of field values (e.g. configs/td3_bc/locomotion.yaml); flags given on the command
    line override it."""
    resume: Optional[str] = None
    """Run folder to continue from its checkpoint.pt, in either phase; its saved config is the
    default and flags override it (not env, seed, or the network sizes)."""
    seed: int = 0
    """Seed of torch, numpy and the environments; same seed on CPU gives identical metrics."""
    device: str = "auto"
    """Torch device: 'auto' picks cuda when available, else cpu."""
    hidden_dims: tuple[int, ...] = (256, 256)
    """Hidden layer widths of the actor and of each twin critic (released code: 256-256)."""
    gamma: float = 0.99
    """Discount factor."""
    tau: float = 5e-3
    """Polyak rate of the target actor and critics, applied with every actor update."""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor."""
    critic_lr: float = 3e-4
    """Adam learning rate of the critics."""
    alpha: float = 2.5
    """TD3+BC's alpha: the actor maximises lambda Q with lambda = alpha / mean|Q|."""
    policy_noise: float = 0.2
    """Std of the Gaussian noise on the target action (target policy smoothing)."""
    noise_clip: float = 0.5
    """The target-action noise is clipped to [-noise_clip, noise_clip]."""
    policy_freq: int = 2
    """One actor and target update every policy_freq critic updates (policy delay)."""

    pretrain_steps: int = 1_000_000
    """Offline gradient steps (released code: 1M)."""
    batch_size: int = 256
    """Mini-batch size, offline and online."""
    pretrain_eval_every: int = 5_000
    """Evaluate every this many pretraining steps (and at the end of pretraining)."""
    pretrained: Optional[str] = None
    """Path of a finished pretraining (pretrain.pt of an earlier run); skips pretraining."""
    random_dataset_steps: int = 1_000_000
    """Size of a *-random dataset generated when none is on disk (D4RL: 1M). Other sizes are
    stored under their own id (local/<env>/<quality>-n<steps>-v0), never as the 1M dataset."""

    online_steps: int = 100_000
    """Online env steps in finetuning (the SO2 paper's budget); 0 stops after pretraining."""
    mixing_ratio: float = 0.5
    """Fraction of each finetuning batch drawn from the dataset; the rest from the online buffer
    (BOORL's batch: 128 + 128)."""
    expl_noise: float = 0.1
    """Std of the Gaussian exploration noise added to the policy's action online (TD3: 0.1)."""
    loose: bool = False
    """Drop the BC term online (plain TD3 finetuning, the SO2 paper's 'loose' TD3+BC)."""
    sera: bool = False
    """Augment online rewards with SERA's Q-conditioned state-entropy reward."""
    sera_k: int = 10
    """k of the k-nearest-neighbour entropy estimate (SERA: about 10 for hopper, 20 for walker2d)."""
    sera_lambda: float = 1.0
    """Weight of the intrinsic reward: r + sera_lambda * r_int."""
    sera_include_self: bool = False
    """Count j = i among the neighbours and in n_q, as the VCSE code does (default: excluded)."""

    eval_every: int = 5_000
    """Evaluate when the online env steps reach a multiple of this (and at the start and end)."""
    eval_episodes: int = 10
    """Evaluation episodes, run together with one batched policy forward per step."""
    kendall_windows: int = 10
    """M: each evaluation episode is cut into M consecutive windows for Kendall's tau."""
    mc_tail_steps: int = 460
    """Q diagnostics skip the last steps of a time-limit-truncated evaluation episode, whose
    Monte-Carlo return misses the cut-off tail (0.99^460 < 1%)."""

    checkpoint_every: int = 10_000
    """Write checkpoint.pt every this many steps of the phase (gradient steps in pretraining, env
    steps online), besides the phase boundary, the end and a SIGINT / SIGTERM."""
    out_dir: str = "runs"
    """Runs are written to <out_dir>/<env>__td3_bc[-<run_name>]__<seed>__<unix time>/."""
    run_name: Optional[str] = None
    """Name added to the run folder to tell variants apart (letters, digits, '.', '-')."""
    track: bool = False
    """Log to Weights & Biases (works with WANDB_MODE=offline)."""
    wandb_project: str = "offline-to-online"
    """W&B project name (runs are grouped by algorithm)."""


# Fields a resumed run cannot change: they define the data, networks, optimisers or evaluation.
RESUME_FIXED = (
    "env", "seed", "hidden_dims", "random_dataset_steps", "eval_episodes", "pretrained", "gamma", "actor_lr",
    "critic_lr", "batch_size", "mixing_ratio", "sera",
)  # fmt: skip
# The step budget of each phase: a resumed run cannot be given fewer steps than it has made.
PHASE_BUDGET = {"pretrain": "pretrain_steps", "finetune": "online_steps"}


def resolve_config(cfg: Config) -> Config:
    """Check every value; ConfigError if bad."""
    parse_env_name(cfg.env)
    check_common(cfg)
    online_batch = cfg.batch_size - int(cfg.batch_size * cfg.mixing_ratio)
    sera_k_max = online_batch - (0 if cfg.sera_include_self else 1)
    check(
        [
            (cfg.pretrain_steps >= 0, "pretrain_steps must be >= 0"),
            (cfg.online_steps >= 0, "online_steps must be >= 0"),
            (2 <= cfg.batch_size <= 1_000_000, "batch_size must be in [2, 1000000]"),
            (0 <= cfg.mixing_ratio < 1, "mixing_ratio must be in [0, 1): finetuning batches need online rows"),
            (
                cfg.online_steps == 0 or cfg.online_steps >= online_batch,
                f"online_steps must be 0 or >= {online_batch} (updates start once the online buffer holds the online rows of a batch)",
            ),
            (cfg.pretrain_eval_every >= 1, "pretrain_eval_every must be >= 1"),
            (1 <= cfg.random_dataset_steps <= 100_000_000, "random_dataset_steps must be in [1, 1e8]"),
            (0 < cfg.gamma < 1 and 0 < cfg.tau <= 1, "gamma must be in (0, 1) and tau in (0, 1]"),
            (0 < cfg.actor_lr <= 1 and 0 < cfg.critic_lr <= 1, "learning rates must be in (0, 1]"),
            (
                len(cfg.hidden_dims) >= 1 and 1 <= min(cfg.hidden_dims) and max(cfg.hidden_dims) <= 65536,
                "hidden_dims must be non-empty and in [1, 65536]",
            ),
            (cfg.alpha > 0, "alpha must be > 0"),
            (
                cfg.policy_noise >= 0 and cfg.noise_clip >= 0 and cfg.expl_noise >= 0,
                "policy_noise, noise_clip and expl_noise must be >= 0",
            ),
            (1 <= cfg.policy_freq <= 1000, "policy_freq must be in [1, 1000]"),
            (cfg.sera_lambda >= 0, "sera_lambda must be >= 0"),
            (
                not cfg.sera or 1 <= cfg.sera_k <= sera_k_max,
                f"sera_k must be in [1, {sera_k_max}] (the online rows of a batch{'' if cfg.sera_include_self else ', minus the sample itself'})",
            ),
        ]
    )
    return cfg


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
class DeterministicActor(nn.Module):
    """pi(s) = tanh(MLP(s)), ReLU trunk of the given widths, nn.Linear's default init (released
    code). forward takes `deterministic` so that the shared Evaluator can call every actor alike;
    exploration noise is added by the online loop, not here."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...]):
        super().__init__()
        layers, fan_in = [], obs_dim
        for width in hidden_dims:
            layers += [nn.Linear(fan_in, width), nn.ReLU()]
            fan_in = width
        self.net = nn.Sequential(*layers, nn.Linear(fan_in, act_dim), nn.Tanh())

    def forward(self, obs: torch.Tensor, deterministic: bool = True) -> tuple[torch.Tensor, None]:
        return self.net(obs), None


class VectorizedCritic(nn.Module):
    """N Q-networks (ReLU MLPs of the given widths on concat(s, a)) as one [N, in, out] weight per
    layer, evaluated with one batched matmul per layer; nn.Linear's default init per member."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], num_critics: int):
        super().__init__()
        sizes = [obs_dim + act_dim, *hidden_dims, 1]
        self.num_critics = num_critics
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(num_critics, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_critics, 1, fan_out).uniform_(-bound, bound)))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """obs [B, S], action [B, A] -> Q [N, B]."""
        x = torch.cat([obs, action], dim=-1).expand(self.num_critics, -1, -1)  # a view: no copy per member
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            x = torch.relu(torch.baddbmm(b, x, w))
        return torch.baddbmm(self.biases[-1], x, self.weights[-1]).squeeze(-1)


class StateNormalized(nn.Module):
    """net((s - mean) / std, ...): the dataset's state statistics as buffers of the network, so the
    replay buffer keeps raw states, every caller (evaluation, SERA, Q diagnostics) passes raw states,
    and checkpoints carry the statistics."""

    def __init__(self, net: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, obs: torch.Tensor, *args, **kwargs):
        return self.net((obs - self.mean) / self.std, *args, **kwargs)


def state_stats(observations: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (+ 1e-3, released code) of the dataset's states, per dimension."""
    obs = observations.astype(np.float64)
    return torch.as_tensor(obs.mean(0), dtype=torch.float32), torch.as_tensor(obs.std(0) + 1e-3, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Losses and updates: the TD3+BC rule (smoothed twin-Q target, delayed actor with a BC term) and SERA
# ----------------------------------------------------------------------------------------------
def smoothed_target_action(
    next_action: torch.Tensor, noise: torch.Tensor, policy_noise: float, noise_clip: float
) -> torch.Tensor:
    """TD3's target policy smoothing: clip(pi'(s') + clip(policy_noise * noise, -c, c), -1, 1) with
    noise ~ N(0, 1) drawn by the caller."""
    return (next_action + (policy_noise * noise).clamp(-noise_clip, noise_clip)).clamp(-1.0, 1.0)


def td3_bc_actor_loss(q1: torch.Tensor, policy_action: torch.Tensor, data_action: torch.Tensor, alpha: float, bc: bool):
    """(loss, lambda). With the BC term: -lambda mean Q1(s, pi(s)) + mean (pi(s) - a)^2, lambda =
    alpha / mean|Q1(s, pi(s))| (detached, released code); without it (--loose online): -mean Q1
    and lambda 1. The squared error is averaged over batch and action dimensions (F.mse_loss)."""
    if not bc:
        return -q1.mean(), q1.new_ones(())
    lmbda = alpha / q1.abs().mean().detach()
    return -lmbda * q1.mean() + (policy_action - data_action).pow(2).mean(), lmbda


def sera_reward(
    states: torch.Tensor, q: torch.Tensor, k: int, include_self: bool, neighbours: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """SERA / VCSE intrinsic reward of each of B samples against the others: states [B, S], q [B]
    (frozen pretrained Q). d_ij = max(||s_i - s_j||, |q_i - q_j|); eps_i = k-th smallest d_ij;
    n_q(i) = #{j : |q_i - q_j| < eps_i}; r = digamma(n_q + 1) / S + log(2 eps + 1e-5). Without
    include_self, j = i is left out of both; given a mask neighbours [B], only those j count. -> [B]."""
    # The direct (non-matmul) distance keeps exact zeros for duplicate states, so ties stay ties.
    d_state = torch.cdist(states, states, compute_mode="donot_use_mm_for_euclid_dist")
    d_q = (q[:, None] - q[None, :]).abs()
    left_out = torch.eye(len(q), dtype=torch.bool, device=q.device) & (not include_self)
    if neighbours is not None:
        left_out = left_out | ~neighbours
    d_state, d_q = d_state.masked_fill(left_out, math.inf), d_q.masked_fill(left_out, math.inf)
    eps = torch.maximum(d_state, d_q).topk(k, dim=1, largest=False).values[:, -1]
    n_q = (d_q < eps[:, None]).sum(1).to(q.dtype)
    return torch.digamma(n_q + 1.0) / states.shape[1] + torch.log(2.0 * eps + 1e-5)


@torch.no_grad()
def sera_bonus(
    frozen_critic: nn.Module, batch: torch.Tensor, n_offline: int, split, cfg: Config
) -> tuple[torch.Tensor, torch.Tensor]:
    """SERA on a mixed batch whose first n_offline rows come from the dataset: (reward bonus [B],
    0 on the dataset rows and sera_lambda * r_int on the online rows; r_int of the online rows),
    with q = min over the twin of the frozen pretrained critic."""
    obs, act = split(batch[n_offline:])[:2]
    r_int = sera_reward(obs, frozen_critic(obs, act).min(0).values, cfg.sera_k, cfg.sera_include_self)
    return torch.cat([r_int.new_zeros(n_offline), cfg.sera_lambda * r_int]), r_int


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


class TD3BCAgent:
    """Actor and twin critics (both on normalised states), their targets and optimisers, and the
    update counter of the policy delay."""

    def __init__(self, obs_dim: int, act_dim: int, cfg: Config, device: torch.device, stats):
        self.cfg, self.device, self.act_dim = cfg, device, act_dim
        mean, std = stats
        self.actor = StateNormalized(DeterministicActor(obs_dim, act_dim, cfg.hidden_dims), mean, std).to(device)
        critic = VectorizedCritic(obs_dim, act_dim, cfg.hidden_dims, NUM_CRITICS)
        self.critic = StateNormalized(critic, mean, std).to(device)
        self.target_actor = copy.deepcopy(self.actor).requires_grad_(False)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.updates = 0  # critic updates so far, pretraining and finetuning (the policy delay)

    def state_dict(self) -> dict:
        return {
            **{
                name: getattr(self, name).state_dict()
                for name in ("actor", "critic", "target_actor", "target_critic", "actor_optim", "critic_optim")
            },
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("actor", "critic", "target_actor", "target_critic", "actor_optim", "critic_optim"):
            getattr(self, name).load_state_dict(state[name])
        self.updates = state["updates"]

    def critic_loss(self, batch: torch.Tensor, split, bonus: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sum over the twin of the mean squared TD error against the smoothed clipped double-Q
        target y = r (+ bonus) + gamma (1 - d) min_i Q'_i(s', smoothed pi'(s'))."""
        cfg = self.cfg
        obs, act, rew, next_obs, done = split(batch)
        if bonus is not None:
            rew = rew + bonus
        with torch.no_grad():
            next_action = self.target_actor(next_obs)[0]
            next_action = smoothed_target_action(
                next_action, torch.randn_like(next_action), cfg.policy_noise, cfg.noise_clip
            )
            y = rew + cfg.gamma * (1.0 - done) * self.target_critic(next_obs, next_action).min(0).values
        return (self.critic(obs, act) - y).pow(2).mean(1).sum()

    def update(self, batch: torch.Tensor, split, bc: bool, bonus: Optional[torch.Tensor] = None) -> dict:
        """One critic step; every policy_freq-th call also an actor step and the target updates.
        Returns the detached critic loss, and the actor loss and lambda when the actor moved."""
        critic_loss = self.critic_loss(batch, split, bonus)
        self.critic_optim.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optim.step()
        self.updates += 1
        out = {"critic_loss": critic_loss.detach()}
        if self.updates % self.cfg.policy_freq == 0:
            obs, act = split(batch)[:2]
            policy_action = self.actor(obs)[0]
            q1 = self.critic(obs, policy_action)[0]  # released code: Q1 only
            actor_loss, lmbda = td3_bc_actor_loss(q1, policy_action, act, self.cfg.alpha, bc)
            self.actor_optim.zero_grad(set_to_none=True)
            actor_loss.backward(inputs=list(self.actor.parameters()))
            self.actor_optim.step()
            soft_update(self.target_critic, self.critic, self.cfg.tau)
            soft_update(self.target_actor, self.actor, self.cfg.tau)
            out.update(actor_loss=actor_loss.detach(), bc_lambda=lmbda)
        return out


# ----------------------------------------------------------------------------------------------
# Train loop
# ----------------------------------------------------------------------------------------------
def losses_record(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in losses.items()}


def pretrain(run: Run, data: ReplayBuffer, step: int, loop: dict) -> None:
    """TD3+BC gradient steps step+1 .. pretrain_steps; loop holds the drawn batch indices and the
    last losses."""
    cfg, agent = run.cfg, run.agent
    # Indices for many steps are drawn at once; a batch is gathered per step from the device buffer.
    chunk, indices = 1000, None if loop["indices"] is None else loop["indices"].to(run.device)
    losses = dict(loop["losses"])
    progress = tqdm(
        range(step + 1, cfg.pretrain_steps + 1),
        desc="pretrain (TD3+BC)",
        unit="upd",
        mininterval=1,
        initial=step,
        total=cfg.pretrain_steps,
    )
    for step in progress:
        if (step - 1) % chunk == 0:
            indices = torch.randint(0, data.size, (chunk, cfg.batch_size), device=data.rows.device)
        losses.update(agent.update(data.rows[indices[(step - 1) % chunk]], data.split, bc=True))
        run.watch(losses)
        if step % cfg.pretrain_eval_every == 0 or step == cfg.pretrain_steps:
            run.check("pretrain", step)
            record = {"phase": "pretrain", "step": step, "env_steps": 0, **run.evaluate(agent), **losses_record(losses)}
            run.write(record)
            progress.set_postfix(score=f"{record['normalized_score']:.1f}")
        if run.stop.signum is not None or step % cfg.checkpoint_every == 0:
            run.save("checkpoint", "pretrain", step, {"indices": indices, "losses": losses})
        if run.stop.signum is not None:
            raise Stopped
    progress.close()


def finetune(run: Run, dataset: ReplayBuffer, step: int, loop: Optional[dict]) -> None:
    """Online env steps step+1 .. online_steps: act with pi(s) + N(0, expl_noise), store the
    transition, then one update on dataset rows + online rows (once the online buffer holds an
    online half-batch). loop (None at the start) holds the online rows, the running episode, the
    last losses and SERA's frozen critic."""
    cfg, agent, device = run.cfg, run.agent, run.device
    online = ReplayBuffer(cfg.online_steps, run.obs_dim, run.act_dim, device)
    offline_batch = int(cfg.batch_size * cfg.mixing_ratio)
    online_batch = cfg.batch_size - offline_batch
    env = make_env(parse_env_name(cfg.env)[0], run.dataset["id"])
    obs, _ = env.reset(seed=cfg.seed)
    # SERA conditions on the critic as pretraining left it, frozen for the whole finetuning.
    frozen_critic = copy.deepcopy(agent.critic).requires_grad_(False) if cfg.sera else None
    if loop is None:
        losses, start_updates = {}, agent.updates
        run.check("finetune", 0)
        run.write({"phase": "finetune", "step": 0, "env_steps": 0, **run.evaluate(agent)})
    else:
        online.load_state_dict(loop["online"])
        restore_env_state(env, loop["env"])
        if frozen_critic is not None:
            frozen_critic.load_state_dict(loop["frozen_critic"])
        obs, losses, start_updates = loop["obs"], dict(loop["losses"]), loop["start_updates"]
    obs_stage = torch.zeros(run.obs_dim, pin_memory=device.type == "cuda")
    progress = tqdm(
        range(step + 1, cfg.online_steps + 1),
        desc="finetune (TD3)" if cfg.loose else "finetune (TD3+BC)",
        unit="env step",
        mininterval=1,
        initial=step,
        total=cfg.online_steps,
    )
    for env_step in progress:
        obs_stage.numpy()[:] = obs
        with torch.no_grad():
            action = agent.actor(obs_stage.to(device)[None])[0][0]
            action = (action + cfg.expl_noise * torch.randn_like(action)).clamp(-1.0, 1.0).cpu().numpy()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        # done = termination only; a time-limit truncation still bootstraps from next_obs.
        online.add(obs, action, reward, next_obs, float(terminated))
        obs = env.reset()[0] if terminated or truncated else next_obs

        if online.size >= online_batch:
            batch = torch.cat([dataset.sample((offline_batch,)), online.sample((online_batch,))])
            bonus, r_int = (
                sera_bonus(frozen_critic, batch, offline_batch, online.split, cfg)
                if frozen_critic is not None
                else (None, None)
            )
            losses.update(agent.update(batch, online.split, bc=not cfg.loose, bonus=bonus))
            if r_int is not None:
                losses["sera_reward"] = r_int.mean()
            run.watch(losses)

        if env_step % cfg.eval_every == 0 or env_step == cfg.online_steps:
            run.check("finetune", env_step)
            record = {
                "phase": "finetune",
                "step": agent.updates - start_updates,
                "env_steps": env_step,
                **run.evaluate(agent),
                **losses_record(losses),
            }
            run.write(record)
            progress.set_postfix(score=f"{record['normalized_score']:.1f}")
        if run.stop.signum is not None or env_step % cfg.checkpoint_every == 0 or env_step == cfg.online_steps:
            loop = {
                "online": online.state_dict(),
                "env": env_state(env),
                "obs": obs,
                "losses": losses,
                "start_updates": start_updates,
                "frozen_critic": None if frozen_critic is None else frozen_critic.state_dict(),
            }
            run.save("checkpoint", "finetune", env_step, loop)
        if run.stop.signum is not None:
            raise Stopped
    progress.close()


def time_phases(run: Run, phase: str, step: int) -> list[tuple[str, int, float]]:
    """(phase, steps left, seconds per step) of the rest of the run, from updates timed on a copy of
    the agent with random rows (policy_freq updates per call, so the actor step is included)."""
    cfg, agent = run.cfg, copy.deepcopy(run.agent)
    fixed = torch.Generator(run.device).manual_seed(0)  # the rows must not draw from the run's RNG
    split = ReplayBuffer(1, run.obs_dim, run.act_dim, run.device).split
    rows = torch.rand(cfg.batch_size, 2 * run.obs_dim + run.act_dim + 2, device=run.device, generator=fixed)

    def updates(bc: bool) -> None:
        for _ in range(cfg.policy_freq):
            agent.update(rows, split, bc=bc)

    parts = []
    if phase == "pretrain" and cfg.pretrain_steps > step:
        per_update = seconds_per_call(lambda: updates(True), run.device, 3) / cfg.policy_freq
        parts.append(("pretraining", cfg.pretrain_steps - step, per_update))
    online_left = cfg.online_steps - (step if phase == "finetune" else 0)
    if online_left > 0:
        per_update = seconds_per_call(lambda: updates(not cfg.loose), run.device, 3) / cfg.policy_freq
        parts.append(("finetuning", online_left, per_update))
    return parts


def read_pretrained(cfg: Config) -> dict:
    """A finished pretraining (pretrain.pt) that fits this run; ConfigError otherwise."""
    saved = read_saved(Path(cfg.pretrained), "pretrain")
    config = saved["config"]
    if config["env"] != cfg.env:
        raise ConfigError(f"checkpoint '{cfg.pretrained}' was pretrained on {config['env']}, not {cfg.env}")
    if tuple(config["hidden_dims"]) != tuple(cfg.hidden_dims):
        raise ConfigError(
            f"checkpoint '{cfg.pretrained}' has hidden_dims {tuple(config['hidden_dims'])}; this run has {cfg.hidden_dims}"
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
    evaluate = Evaluator(base, [make_env(base, dataset_id) for _ in range(cfg.eval_episodes)], cfg, device)
    agent = TD3BCAgent(obs_dim, act_dim, cfg, device, state_stats(arrays["observations"]))
    if pretrained is not None:
        agent.load_state_dict(pretrained["agent"])
    first = ("pretrain", {"indices": None, "losses": {}}) if pretrained is None else ("finetune", None)
    with open_run(cfg, checkpoint, agent, evaluate, device, data_info, first) as (run, phase, step, loop):
        variant = "TD3+BC" + (" loose" if cfg.loose else "") + (" + SERA" if cfg.sera else "")
        print(
            f"run {run.dir}: dataset {dataset_id} ({len(arrays['rewards'])} transitions), {variant}, device {device}, {phase} from step {step}",
            file=sys.stderr,
        )
        announce_time(time_phases(run, phase, step))
        dataset = ReplayBuffer(len(arrays["rewards"]), obs_dim, act_dim, device)
        dataset.extend(dataset_rows(arrays))
        if phase == "pretrain":
            pretrain(run, dataset, step, loop)
            step, loop = run.end_pretraining()
        if cfg.online_steps > 0:
            finetune(run, dataset, step, loop)
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


def dataset_rows(arrays: dict[str, np.ndarray]) -> torch.Tensor:
    """Flat arrays -> replay rows [obs | action | reward | next_obs | done]; done = terminals only:
    a time-limit truncation keeps bootstrapping."""
    keys = ("observations", "actions", "rewards", "next_observations", "terminals")
    return torch.from_numpy(np.concatenate([arrays[k].reshape(len(arrays["rewards"]), -1) for k in keys], axis=1))


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
