"""Off2On: an ensemble of CQL agents pretrained offline, finetuned online as one moment-matched
mixture policy with balanced replay, optionally with SO2's techniques.

Papers: Lee et al., "Offline-to-Online Reinforcement Learning via Balanced Replay and Pessimistic
Q-Ensemble", CoRL 2021 (arXiv 2107.00591, code shlee94/Off2OnRL); Kumar et al., "Conservative
Q-Learning for Offline Reinforcement Learning", NeurIPS 2020 (CQL, code aviralkumar2907/CQL);
Zhang et al., "A Perspective of Q-value Estimation on Offline-to-Online Reinforcement Learning",
AAAI 2024 (SO2, its Table 9 adds SO2 to Off2On).
Pipeline in this file, top to bottom:
  1. the D4RL-style dataset, resolved to a Minari dataset (generated on the spot for *-random by
     scripts/make_dataset.py);
  2. offline pretraining: K = 5 independent CQL agents (each a tanh-Gaussian policy, twin critics
     and its own temperature), trained side by side as one vectorised ensemble, each on its own
     mini-batches, by the CQL release's values for MuJoCo: CQL(H) with the importance-sampled
     logsumexp over 10 random, 10 policy actions at s and 10 at s' (min_q_weight 5, no Lagrange),
     a one-sample backup without entropy, and behaviour cloning as the policy objective for the
     first 40,000 steps; each agent's temperature steps first, then its policy and twin critics
     on losses from the same parameters (the CQL release builds the policy loss before its
     critic steps; the order it then ran in depended on the PyTorch version, CQL issue #5);
  3. online finetuning (the Off2On release, rlkit/torch/sac/ours.py): the K policies form ONE
     policy, the Gaussian whose mean and variance match the mixture of the K pre-tanh Gaussians;
     it acts, and it is trained by SAC (one temperature, reset to 1) on the mean over the agents of
     min(Q_k1, Q_k2). Each agent's twin critics learn SAC's target from the mixture's next action,
     without the CQL term. Balanced replay: a density-ratio network w(s, a) learns how online-like
     a transition is (Jensen-Shannon form), and the RL batch is drawn from dataset + online rows by
     priority w^(1/T) / mean over dataset rows, T = 5, clipped to [0.001, 1000]; priorities of the
     sampled rows are refreshed after each update, new rows get the running maximum;
  4. batched deterministic evaluation (tanh of the mixture mean) with the same Q diagnostics as
     algorithms/so2.py, over all 2K Q networks.
The run folder (checkpoint, --resume, signals, divergence) is the same in every algorithm file.

Online defaults follow the release (examples/ours.py): 2x256 networks, Adam 3e-4 for the policy,
the critics, the temperature and the density-ratio network, batch 256, target rate 0.005, epochs
of 1,000 env steps (collect with the stochastic mixture from a reset, so an epoch's last episode is
cut there; then 1,000 updates; the first epoch runs 10x the updates, first_epoch_multiplier),
init_online_fraction 0.5, weight-net batches of 256 dataset + 256 online rows (online: the newest
250,000). Evaluation after every epoch. The online budget is the SO2 paper's 100k env steps (the
release: 251 epochs).
--so2 (SO2 Table 9; the paper does not give its code): the perturbed value update on the
mixture's next action in the TD target, a~' = clip(a' + clip(N(0, 0.3^2), -0.6, 0.6), -1, 1), the
entropy term keeping log pi(a'|s') (as algorithms/so2.py), and 10 updates per env step (critics,
density-ratio network, priorities); the policy and temperature step on every 10th update, once per
env step as in SO2's code. The first epoch's multiplier applies to these updates too. The updates
keep Off2On's schedule, a block of 10,000 after each epoch's 1,000 env steps (SO2's code
interleaves 1 env step and 10 updates), and Off2On's learned temperature (Adam 3e-4; SO2's release
fixes it at 0.2).
Deliberate differences from the releases:
  - pretraining: the Off2On release loads CQL checkpoints (seeds i * 4 + seed, only halfcheetah-
    medium ones were published) and has no pretraining code; here the K agents are pretrained in
    this file, vectorised, from one seed (independent initial weights and batches per agent).
  - the dataset keeps every transition (the release drops rows flagged as timeouts, whose next
    state it cannot rebuild; the Minari arrays hold every next state).
  - priority sampling is stratified over the cumulative sum of the priorities on the device (the
    release: a sum tree with the same stratification); the store holds the whole online budget,
    so nothing is evicted from it (the release's sum tree is sized so that it never evicts either
    at its budget).
  - networks: 2 x 256 everywhere, as the Off2On release's policies and critics (its CQL checkpoints
    have two hidden layers; the CQL release's MuJoCo script builds three). The agents' log-std is
    clipped to [-20, 2] as in the Off2On release's policy class (the CQL release's policy: [-5, 2]
    and its mean clamped to [-9, 9]); the mixture's std to [e^-20, e^2] as the release. Log-probs
    use the exact tanh correction (the CQL release: log(1 - a^2 + 1e-6)); behaviour cloning
    evaluates dataset actions clipped to +-(1 - 1e-6). Initialisation as algorithms/so2.py's
    (hidden weights U(+-1/sqrt(fan_in)), hidden biases 0.1, last layers U(+-3e-3) / U(+-1e-3));
    rlkit's fanin_init bounds by the layer's output width, and the Off2On release's density-ratio
    network has hidden biases 0.
  - evaluation: eval_episodes whole episodes (5; the release runs 5,000 evaluation steps of
    complete episodes, 5 episodes only when none ends early).
  - a finished run resumed with a larger --online-steps continues exactly as the longer run only
    when its old budget is a multiple of epoch_steps (otherwise its cut last epoch moves the later
    epoch boundaries).
  - environments are gymnasium v5 MuJoCo and Minari datasets (the releases used D4RL on gym).
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

ALGO = "off2on"
FIRST_RESULT = "For a first result on a CPU, shrink the budgets as configs/sweeps/off2on_cpu.yaml does: --pretrain-steps 1000 --cql-bc-steps 200 --online-steps 3000 --first-epoch-multiplier 1 (about 30 min on one core; with --so2 about 50 min)"
REPO_ROOT = Path(__file__).resolve().parent.parent
PRIORITY_CLIP = (1e-3, 1e3)  # release: priorities w^(1/T) / mean are clipped to [0.001, 1000]
LOG_STD_BOUNDS = (-20.0, 2.0)  # rlkit's TanhGaussianPolicy, for each agent and for the mixture


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclass
class Config:
    env: str = "hopper-random"
    """D4RL-style dataset name: {halfcheetah,hopper,walker2d,ant}-{random,medium,medium-replay,
    medium-expert,expert}, {pen,door}-{random,medium,human,cloned,expert} or antmaze-<maze> (README)."""
    config: Optional[str] = None
    """YAML file of field values (e.g. configs/off2on/locomotion.yaml); flags given on the command
    line override it."""
    resume: Optional[str] = None
    """Run folder to continue from its checkpoint.pt, in either phase; its saved config is the
    default and flags override it (not env, seed, or the network sizes)."""
    seed: int = 0
    """Seed of torch, numpy and the environments; same seed on CPU gives identical metrics."""
    device: str = "auto"
    """Torch device: 'auto' picks cuda when available, else cpu."""
    hidden_dims: tuple[int, ...] = (256, 256)
    """Hidden layer widths of each policy, each critic and the density-ratio network (release: 2 x 256)."""
    num_agents: int = 5
    """K: CQL agents in the ensemble, each with a policy and twin critics (release: 5)."""
    gamma: float = 0.99
    """Discount factor."""
    tau: float = 5e-3
    """Polyak rate of the target critics, applied after every update."""
    critic_lr: float = 3e-4
    """Adam learning rate of the critics, offline and online (both releases: 3e-4)."""
    pretrain_actor_lr: float = 1e-4
    """Adam learning rate of the policies and temperatures in pretraining (CQL release: policy_lr 1e-4)."""
    actor_lr: float = 3e-4
    """Adam learning rate of the mixture policy and its temperature online (Off2On release: 3e-4)."""

    cql_alpha: float = 5.0
    """CQL weight (CQL release's MuJoCo command: min_q_weight 5, no Lagrange)."""
    cql_n_actions: int = 10
    """Random actions, policy actions at s and policy actions at s' in the CQL logsumexp (each; CQL
    release: num_random 10)."""
    cql_bc_steps: int = 40_000
    """Pretraining steps before this one train each policy by behaviour cloning, alpha log pi -
    log pi(a_data | s), instead of its Q (CQL release: policy_eval_start 40,000)."""
    pretrain_steps: int = 1_000_000
    """Offline gradient steps of every agent (the Off2On release's CQL checkpoints: 1M)."""
    batch_size: int = 256
    """Mini-batch size, offline (per agent) and online (one batch for the whole ensemble)."""
    pretrain_eval_every: int = 10_000
    """Evaluate every this many pretraining steps (and at the end of pretraining)."""
    pretrained: Optional[str] = None
    """Path of a finished pretraining (pretrain.pt of an earlier run); skips pretraining."""
    random_dataset_steps: int = 1_000_000
    """Size of a *-random dataset generated when none is on disk (D4RL: 1M). Other sizes are
    stored under their own id (local/<env>/<quality>-n<steps>-v0), never as the 1M dataset."""

    online_steps: int = 100_000
    """Online env steps in finetuning (the SO2 paper's budget); 0 stops after pretraining."""
    epoch_steps: int = 1_000
    """Env steps collected by the current policy before each round of epoch_steps x utd updates
    (release: 1,000 per epoch)."""
    first_epoch_multiplier: int = 10
    """The first epoch runs this many times the updates (release default: 10; its README example: 5)."""
    init_online_fraction: float = 0.5
    """New online rows start with a priority that gives the first epoch's rows this share of the
    total priority (release: 0.5)."""
    priority_temperature: float = 5.0
    """T: a row's priority is w^(1/T), relative to the dataset rows (release: 5)."""
    weight_lr: float = 3e-4
    """Adam learning rate of the density-ratio network (release: 3e-4)."""
    weight_batch_size: int = 256
    """Dataset rows and online rows (each) of the density-ratio network's batch (release: 256)."""
    online_buffer_size: int = 250_000
    """The density-ratio network's online rows are drawn from the newest this many (release: 250,000)."""
    so2: bool = False
    """Finetune with SO2's perturbed value update (so2_sigma, so2_noise_clip) and so2_utd updates
    per env step (the SO2 paper's Table 9 combination; see the header)."""
    so2_sigma: float = 0.3
    """With --so2: std of the noise on the next action of the TD target (SO2: 0.3)."""
    so2_noise_clip: float = 0.6
    """With --so2: that noise is clipped to [-so2_noise_clip, so2_noise_clip] (SO2: 0.6)."""
    so2_utd: int = 10
    """With --so2: updates per online env step (SO2: 10); the policy steps once per env step."""

    eval_every: int = 1_000
    """Evaluate when the online env steps pass a multiple of this, after that epoch's updates (and
    at the start and end; release: every epoch)."""
    eval_episodes: int = 5
    """Evaluation episodes, run together with one batched policy forward per step (release: 5,000
    steps of complete episodes, i.e. 5 when none ends early)."""
    kendall_windows: int = 10
    """M: each evaluation episode is cut into M consecutive windows for Kendall's tau."""
    mc_tail_steps: int = 460
    """Q diagnostics skip the last steps of a time-limit-truncated evaluation episode, whose
    Monte-Carlo return misses the cut-off tail (0.99^460 < 1%)."""

    checkpoint_every: int = 10_000
    """Write checkpoint.pt every this many steps of the phase (gradient steps in pretraining, env
    steps online), besides the phase boundary, the end and a SIGINT / SIGTERM."""
    out_dir: str = "runs"
    """Runs are written to <out_dir>/<env>__off2on[-<run_name>]__<seed>__<unix time>/."""
    run_name: Optional[str] = None
    """Name added to the run folder to tell variants apart (letters, digits, '.', '-')."""
    track: bool = False
    """Log to Weights & Biases (works with WANDB_MODE=offline)."""
    wandb_project: str = "offline-to-online"
    """W&B project name (runs are grouped by algorithm)."""


# Fields a resumed run cannot change: they define the data, networks, optimisers or evaluation.
RESUME_FIXED = (
    "env", "seed", "hidden_dims", "num_agents", "random_dataset_steps", "eval_episodes", "pretrained", "gamma",
    "critic_lr", "pretrain_actor_lr", "actor_lr", "weight_lr", "batch_size", "epoch_steps", "init_online_fraction",
    "so2",
)  # fmt: skip
# The step budget of each phase: a resumed run cannot be given fewer steps than it has made.
PHASE_BUDGET = {"pretrain": "pretrain_steps", "finetune": "online_steps"}


def resolve_config(cfg: Config) -> Config:
    """Check every value; ConfigError if bad."""
    parse_env_name(cfg.env)
    check_common(cfg)
    check(
        [
            (1 <= cfg.num_agents <= 100, "num_agents must be in [1, 100]"),
            (cfg.pretrain_steps >= 0, "pretrain_steps must be >= 0"),
            (cfg.online_steps >= 0, "online_steps must be >= 0"),
            (2 <= cfg.batch_size <= 1_000_000, "batch_size must be in [2, 1000000]"),
            (1 <= cfg.weight_batch_size <= 1_000_000, "weight_batch_size must be in [1, 1000000]"),
            (cfg.pretrain_eval_every >= 1, "pretrain_eval_every must be >= 1"),
            (1 <= cfg.random_dataset_steps <= 100_000_000, "random_dataset_steps must be in [1, 1e8]"),
            (0 < cfg.gamma < 1 and 0 < cfg.tau <= 1, "gamma must be in (0, 1) and tau in (0, 1]"),
            (
                all(0 < lr <= 1 for lr in (cfg.critic_lr, cfg.pretrain_actor_lr, cfg.actor_lr, cfg.weight_lr)),
                "learning rates must be in (0, 1]",
            ),
            (
                len(cfg.hidden_dims) >= 1 and 1 <= min(cfg.hidden_dims) and max(cfg.hidden_dims) <= 65536,
                "hidden_dims must be non-empty and in [1, 65536]",
            ),
            (cfg.cql_alpha >= 0, "cql_alpha must be >= 0"),
            (1 <= cfg.cql_n_actions <= 1000, "cql_n_actions must be in [1, 1000]"),
            (cfg.cql_bc_steps >= 0, "cql_bc_steps must be >= 0"),
            (1 <= cfg.epoch_steps <= 1_000_000, "epoch_steps must be in [1, 1000000]"),
            (1 <= cfg.first_epoch_multiplier <= 1000, "first_epoch_multiplier must be in [1, 1000]"),
            (0 < cfg.init_online_fraction < 1, "init_online_fraction must be in (0, 1)"),
            (cfg.priority_temperature > 0, "priority_temperature must be > 0"),
            (cfg.online_buffer_size >= 1, "online_buffer_size must be >= 1"),
            (
                cfg.so2_sigma >= 0 and cfg.so2_noise_clip >= 0 and 1 <= cfg.so2_utd <= 10_000,
                "so2_sigma and so2_noise_clip must be >= 0 and so2_utd in [1, 10000]",
            ),
        ]
    )
    return cfg


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
class EnsembleMLP(nn.Module):
    """M ReLU MLPs of the same sizes as one [M, in, out] weight per layer, evaluated with one batched
    matmul per layer: x [M, B, in] -> [M, B, out]. Init of algorithms/so2.py (EDAC): hidden weights
    U(+-1/sqrt(fan_in)) and biases 0.1; last weights U(+-last_init), last biases U(+-last_init) or
    last_bias."""

    def __init__(self, sizes: list[int], members: int, last_init: float, last_bias: Optional[float] = None):
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            last = i == len(sizes) - 2
            bound = last_init if last else 1 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(members, fan_in, fan_out).uniform_(-bound, bound)))
            bias = torch.full((members, 1, fan_out), 0.1)
            if last:
                bias = bias.uniform_(-last_init, last_init) if last_bias is None else bias.fill_(last_bias)
            self.biases.append(nn.Parameter(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            x = torch.relu(torch.baddbmm(b, x, w))
        return torch.baddbmm(self.biases[-1], x, self.weights[-1])


def squashed_log_prob(mu: torch.Tensor, std: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """log density of tanh(u) for u ~ N(mu, std), summed over the last dim:
    log N(u; mu, std) - log|d tanh(u)/du|, with log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))."""
    log_normal = -0.5 * ((u - mu) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return (log_normal - 2 * (math.log(2) - u - nn.functional.softplus(-2 * u))).sum(-1)


def squashed_sample(mu: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tanh(u), its log-prob) for a reparameterised u ~ N(mu, std)."""
    u = mu + std * torch.randn_like(mu)
    return torch.tanh(u), squashed_log_prob(mu, std, u)


def mixture_moments(mu: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian with the mean and variance of the equal-weight mixture of K Gaussians
    N(mu_k, std_k^2) (mu, std [K, ...]): mean = mean_k mu_k, var = mean_k (std_k^2 + mu_k^2) - mean^2;
    its std clipped to [e^-20, e^2] (release). -> (mean, std) [...]."""
    mean = mu.mean(0)
    var = (std.pow(2) + mu.pow(2)).mean(0) - mean.pow(2)
    low, high = (math.exp(bound) for bound in LOG_STD_BOUNDS)
    return mean, var.clamp_min(low**2).sqrt().clamp_max(high)


class MixturePolicy(nn.Module):
    """K tanh-Gaussian policies (rlkit's TanhGaussianPolicy: log-std head clipped to [-20, 2], heads
    initialised U(+-1e-3)) as one vectorised module. Offline each agent acts and learns on its own
    (`agents`, `sample_agents`); the module itself is the ensemble's policy: tanh of the
    moment-matched Gaussian of the K pre-tanh Gaussians (Off2On release)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], num_agents: int):
        super().__init__()
        self.num_agents = num_agents
        self.net = EnsembleMLP([obs_dim, *hidden_dims, 2 * act_dim], num_agents, last_init=1e-3)

    def agents(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs [B, S] (the same states for every agent) or [K, B, S] -> pre-tanh mean and std [K, B, A]."""
        if obs.dim() == 2:
            obs = obs.expand(self.num_agents, -1, -1)
        mu, log_std = self.net(obs).chunk(2, dim=-1)
        return mu, log_std.clamp(*LOG_STD_BOUNDS).exp()

    def sample_agents(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each agent's own action and log-prob at its states: [K, B, A], [K, B]."""
        return squashed_sample(*self.agents(obs))

    def log_prob_agents(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Each agent's log-prob of the given actions (clipped to +-(1 - 1e-6), so atanh is finite):
        obs [K, B, S], action [K, B, A] -> [K, B]."""
        mu, std = self.agents(obs)
        return squashed_log_prob(mu, std, torch.atanh(action.clamp(-1 + 1e-6, 1 - 1e-6)))

    def forward(self, obs: torch.Tensor, deterministic: bool = False):
        """The mixture policy at obs [B, S]: (action [B, A] in [-1, 1], log-prob [B]); tanh of the
        mixture mean and no log-prob when deterministic."""
        mean, std = mixture_moments(*self.agents(obs))
        if deterministic:
            return torch.tanh(mean), None
        return squashed_sample(mean, std)


class TwinCriticEnsemble(nn.Module):
    """The K agents' twin critics: 2K Q-networks (ReLU MLPs on concat(s, a)) as one EnsembleMLP;
    networks 2k and 2k + 1 belong to agent k. rlkit / EDAC init (last layer U(+-3e-3))."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], num_agents: int):
        super().__init__()
        self.num_critics = 2 * num_agents
        self.net = EnsembleMLP([obs_dim + act_dim, *hidden_dims, 1], self.num_critics, last_init=3e-3)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """obs [B, S] and action [B, A]: every network on the same pairs; obs [K, B, S] and action
        [K, B, A]: agent k's pairs to its twin. -> Q [2K, B]."""
        x = torch.cat([obs, action], dim=-1)
        x = x.expand(self.num_critics, -1, -1) if x.dim() == 2 else x.repeat_interleave(2, dim=0)
        return self.net(x).squeeze(-1)

    def twin_min(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """min(Q_k1, Q_k2) of every agent k: [K, B]."""
        q = self.forward(obs, action)
        return q.view(self.num_critics // 2, 2, -1).min(1).values


class DensityRatio(nn.Module):
    """w(s, a) = relu(MLP(s, a)) >= 0, the estimated ratio d_online / d_offline of a transition
    (release: 2 x 256, last layer U(+-3e-3) with bias 1, so every w starts near 1)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...]):
        super().__init__()
        self.net = EnsembleMLP([obs_dim + act_dim, *hidden_dims, 1], 1, last_init=3e-3, last_bias=1.0)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """obs [B, S], action [B, A] -> w [B]."""
        return torch.relu(self.net(torch.cat([obs, action], dim=-1)[None]))[0, :, 0]


# ----------------------------------------------------------------------------------------------
# Losses and updates: Off2On (K CQL agents offline; mixture SAC, density ratio, priorities online)
# ----------------------------------------------------------------------------------------------
def cql_logsumexp(
    q_random, q_current, log_pi_current, q_next, log_pi_next, act_dim: int, mc_bound: Optional[torch.Tensor]
) -> torch.Tensor:
    """Importance-sampled CQL logsumexp (released code's cql_importance_sample) at states s.
    q_random [N, n, B]: Q(s, a ~ U[-1, 1]^A), density 0.5^A; q_current / q_next [N, n, B]: Q(s, a)
    for a ~ pi(.|s) and a ~ pi(.|s'), with log-probs [n, B]. Cal-QL (mc_bound [B] given): the
    policy-action Q values are replaced by max(Q, return-to-go) before the importance weights;
    random actions are not bounded. -> [N, B]."""
    if mc_bound is not None:
        q_current = torch.maximum(q_current, mc_bound)
        q_next = torch.maximum(q_next, mc_bound)
    random_log_density = act_dim * math.log(0.5)
    return torch.logsumexp(
        torch.cat([q_random - random_log_density, q_next - log_pi_next, q_current - log_pi_current], dim=1), dim=1
    )


def density_ratio_loss(w_offline: torch.Tensor, w_online: torch.Tensor) -> torch.Tensor:
    """The release's Jensen-Shannon form: E_off[-log(2 / (w + 1))] - E_on[log(2 w / (w + 1))]
    (1e-10 inside each log); its minimiser is w = d_online / d_offline."""
    offline = -torch.log(2.0 / (w_offline + 1.0) + 1e-10).mean()
    online = -torch.log(2.0 * w_online / (w_online + 1.0) + 1e-10).mean()
    return offline + online


def priorities(w: torch.Tensor, w_offline: torch.Tensor, temperature: float) -> torch.Tensor:
    """Balanced-replay priorities of rows with density ratios w: w^(1/T) / (mean over the dataset
    rows of the weight batch of w_off^(1/T) + 1e-10), clipped to [0.001, 1000]."""
    normaliser = w_offline.pow(1.0 / temperature).mean() + 1e-10
    return (w.pow(1.0 / temperature) / normaliser).clamp(*PRIORITY_CLIP)


def initial_max_priority(dataset_size: int, online_fraction: float, epoch_steps: int) -> float:
    """The priority new online rows start with: dataset rows enter with priority 1, so epoch_steps
    rows at M f / ((1 - f) epoch_steps) hold the share f of the total after the first epoch
    (release: OurRLAlgorithm sets the sum tree's max to this)."""
    return dataset_size * online_fraction / ((1.0 - online_fraction) * epoch_steps)


def stratified_draw(cumulative: torch.Tensor, n: int) -> torch.Tensor:
    """n row indices by priority: one uniform draw in each of n equal slices of the total priority,
    located on the cumulative sum (the release's sum tree draws the same way)."""
    total = cumulative[-1]
    u = (
        torch.arange(n, device=cumulative.device, dtype=cumulative.dtype)
        + torch.rand(n, device=cumulative.device, dtype=cumulative.dtype)
    ) * (total / n)
    return torch.searchsorted(cumulative, u, right=True).clamp_max(len(cumulative) - 1)


def perturb_action(action: torch.Tensor, noise: torch.Tensor, sigma: float, noise_clip: float) -> torch.Tensor:
    """Perturbed Value Update: a~ = clip(a + clip(sigma * noise, -c, c), -1, 1), noise ~ N(0, 1)."""
    return (action + (sigma * noise).clamp(-noise_clip, noise_clip)).clamp(-1.0, 1.0)


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


class Off2OnAgent:
    """The ensemble's policies (one MixturePolicy), the 2K critics and their targets, the offline
    temperatures (one per agent) and the online one, the density-ratio network, and optimisers."""

    def __init__(self, obs_dim: int, act_dim: int, cfg: Config, device: torch.device):
        self.cfg, self.device, self.act_dim = cfg, device, act_dim
        k, hidden = cfg.num_agents, cfg.hidden_dims
        self.actor = MixturePolicy(obs_dim, act_dim, hidden, k).to(device)
        self.critic = TwinCriticEnsemble(obs_dim, act_dim, hidden, k).to(device)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.weight_net = DensityRatio(obs_dim, act_dim, hidden).to(device)
        self.log_alphas = torch.zeros(k, device=device, requires_grad=True)  # offline, one per agent
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)  # online (release: starts at 1)
        self.target_entropy = -float(act_dim)
        self.online = False
        self.new_optimisers()

    def new_optimisers(self) -> None:
        """Fresh Adam states with the phase's learning rates. One Adam over a [K, ...] parameter
        whose loss is a sum over agents is K independent Adams."""
        actor_lr = self.cfg.actor_lr if self.online else self.cfg.pretrain_actor_lr
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=actor_lr)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=self.cfg.critic_lr)
        self.alpha_optim = torch.optim.Adam([self.log_alpha if self.online else self.log_alphas], lr=actor_lr)
        self.weight_optim = torch.optim.Adam(self.weight_net.parameters(), lr=self.cfg.weight_lr)

    def go_online(self) -> None:
        """Start finetuning: one temperature at 1 and fresh optimisers with the online rates (the
        release builds a new trainer around the loaded networks)."""
        self.online = True
        with torch.no_grad():
            self.log_alpha.zero_()
        self.new_optimisers()

    # the networks and optimisers in the state dict, by attribute name
    MODULES = (
        "actor", "critic", "target_critic", "weight_net", "actor_optim", "critic_optim", "alpha_optim", "weight_optim"
    )  # fmt: skip

    def state_dict(self) -> dict:
        return {
            **{name: getattr(self, name).state_dict() for name in self.MODULES},
            "log_alphas": self.log_alphas.detach().cpu(),
            "log_alpha": self.log_alpha.detach().cpu(),
            "online": self.online,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["online"] and not self.online:
            self.go_online()
        for name in self.MODULES:
            getattr(self, name).load_state_dict(state[name])
        with torch.no_grad():
            self.log_alphas.copy_(state["log_alphas"])
            self.log_alpha.copy_(state["log_alpha"])

    def pretrain_update(self, batch: torch.Tensor, split, bc: bool) -> dict[str, torch.Tensor]:
        """One CQL step of every agent on its own batch [K, B, row], in the CQL release's order: the
        temperatures step first; the policies (behaviour cloning when bc) and the critics then
        step on losses from the same parameters; then the targets."""
        cfg, n, k = self.cfg, self.cfg.cql_n_actions, self.cfg.num_agents
        obs, act, rew, next_obs, done = split(batch)
        b = obs.shape[1]
        new_action, log_pi = self.actor.sample_agents(obs)
        alpha_loss = -(self.log_alphas[:, None] * (log_pi.detach() + self.target_entropy)).mean(1).sum()
        self.alpha_optim.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_optim.step()
        alpha = self.log_alphas.detach().exp()[:, None]
        fit = self.actor.log_prob_agents(obs, act) if bc else self.critic.twin_min(obs, new_action)
        actor_loss = (alpha * log_pi - fit).mean(1).sum()

        with torch.no_grad():
            # One policy forward per agent for the next action of the backup and the CQL actions
            # at s and at s' (all evaluated by Q at s).
            states = torch.cat([next_obs, obs.repeat(1, n, 1), next_obs.repeat(1, n, 1)], dim=1)
            actions, log_pis = self.actor.sample_agents(states)
            # CQL release for MuJoCo: one next action, no entropy in the backup (deterministic_backup).
            next_q = self.target_critic.twin_min(next_obs, actions[:, :b])
            y = (rew + cfg.gamma * (1.0 - done) * next_q).repeat_interleave(2, dim=0)
        random_actions = torch.empty(k, n * b, self.act_dim, device=obs.device).uniform_(-1.0, 1.0)
        all_actions = torch.cat([act, random_actions, actions[:, b:]], dim=1)
        q = self.critic(obs.repeat(1, 1 + 3 * n, 1), all_actions).view(2 * k, 1 + 3 * n, b)
        q_data, q_random, q_current, q_next = q[:, 0], q[:, 1 : 1 + n], q[:, 1 + n : 1 + 2 * n], q[:, 1 + 2 * n :]
        log_pis = log_pis[:, b:].reshape(k, 2 * n, b).repeat_interleave(2, dim=0)
        ood = cql_logsumexp(q_random, q_current, log_pis[:, :n], q_next, log_pis[:, n:], self.act_dim, None)
        gap = (ood - q_data).mean(1)  # per critic
        bellman = (q_data - y).pow(2).mean(1).sum()
        critic_loss = bellman + cfg.cql_alpha * gap.sum()

        for loss, optim, params in (
            (actor_loss, self.actor_optim, list(self.actor.parameters())),
            (critic_loss, self.critic_optim, list(self.critic.parameters())),
        ):
            optim.zero_grad(set_to_none=True)
            loss.backward(inputs=params)
        self.actor_optim.step()
        self.critic_optim.step()
        soft_update(self.target_critic, self.critic, cfg.tau)
        return {
            "alpha": alpha.mean(),
            "alpha_loss": alpha_loss.detach(),
            "actor_loss": actor_loss.detach(),
            "critic_loss": critic_loss.detach(),
            "bellman_loss": bellman.detach(),
            "cql_gap": gap.mean().detach(),
        }

    def online_update(
        self, batch: torch.Tensor, weight_rows: torch.Tensor, split, policy_step: bool, sigma: float
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One Off2On update on the prioritised batch [B, row] and the density-ratio batch
        weight_rows [2 Bw, row] (dataset rows, then online rows). Every loss from the same
        parameters (the temperature in them as before its step), then every step, then the
        targets. policy_step: the temperature and the mixture policy step too; sigma > 0 perturbs
        the next action of the TD target (--so2). Returns the losses and the batch rows' new
        priorities, from the density-ratio network before its step."""
        cfg = self.cfg
        obs, act, rew, next_obs, done = split(batch)
        alpha = self.log_alpha.detach().exp()
        out, params = {}, {}
        if policy_step:
            new_action, log_pi = self.actor(obs)
            out["alpha"] = -(self.log_alpha * (log_pi.detach() + self.target_entropy)).mean()
            out["actor"] = (alpha * log_pi - self.critic.twin_min(obs, new_action).mean(0)).mean()
            params["alpha"] = ([self.log_alpha], self.alpha_optim)
            params["actor"] = (list(self.actor.parameters()), self.actor_optim)
        with torch.no_grad():
            next_action, next_log_pi = self.actor(next_obs)
            if sigma > 0:
                next_action = perturb_action(next_action, torch.randn_like(next_action), sigma, cfg.so2_noise_clip)
            next_v = self.target_critic.twin_min(next_obs, next_action) - alpha * next_log_pi
            y = (rew + cfg.gamma * (1.0 - done) * next_v).repeat_interleave(2, dim=0)
        out["critic"] = (self.critic(obs, act) - y).pow(2).mean(1).sum()
        params["critic"] = (list(self.critic.parameters()), self.critic_optim)
        w_obs, w_act = split(torch.cat([weight_rows, batch]))[:2]
        w = self.weight_net(w_obs, w_act)
        half = cfg.weight_batch_size
        w_offline, w_online, w_batch = w[:half], w[half : 2 * half], w[2 * half :]
        out["weight"] = density_ratio_loss(w_offline, w_online)
        params["weight"] = (list(self.weight_net.parameters()), self.weight_optim)
        new_priorities = priorities(w_batch.detach(), w_offline.detach(), cfg.priority_temperature)

        for name, (inputs, optim) in params.items():
            optim.zero_grad(set_to_none=True)
            out[name].backward(inputs=inputs)
        for _, optim in params.values():
            optim.step()
        soft_update(self.target_critic, self.critic, cfg.tau)
        logged = {f"{name}_loss": value.detach() for name, value in out.items()}
        logged.update(alpha=alpha, w_online=w_online.mean().detach(), w_offline=w_offline.mean().detach())
        return logged, new_priorities


# ----------------------------------------------------------------------------------------------
# Train loop
# ----------------------------------------------------------------------------------------------
def losses_record(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in losses.items()}


def pretrain(run: Run, data: ReplayBuffer, step: int, loop: dict) -> None:
    """CQL gradient steps step+1 .. pretrain_steps of every agent; loop holds the drawn batch indices."""
    cfg, agent = run.cfg, run.agent
    # Indices for many steps are drawn at once (one batch per agent and step); a batch is gathered
    # per step from the device buffer.
    chunk, indices = 1000, None if loop["indices"] is None else loop["indices"].to(run.device)
    progress = tqdm(
        range(step + 1, cfg.pretrain_steps + 1),
        desc=f"pretrain ({cfg.num_agents} x CQL)",
        unit="upd",
        mininterval=1,
        initial=step,
        total=cfg.pretrain_steps,
    )
    for step in progress:
        if (step - 1) % chunk == 0:
            indices = torch.randint(0, data.size, (chunk, cfg.num_agents, cfg.batch_size), device=data.rows.device)
        # CQL release: the policy is cloned while its step counter (1, 2, ...) is below policy_eval_start.
        bc = step < cfg.cql_bc_steps
        losses = agent.pretrain_update(data.rows[indices[(step - 1) % chunk]], data.split, bc)
        run.watch(losses)
        if step % cfg.pretrain_eval_every == 0 or step == cfg.pretrain_steps:
            run.check("pretrain", step)
            record = {"phase": "pretrain", "step": step, "env_steps": 0, **run.evaluate(agent), **losses_record(losses)}
            run.write(record)
            progress.set_postfix(score=f"{record['normalized_score']:.1f}")
        if run.stop.signum is not None or step % cfg.checkpoint_every == 0:
            run.save("checkpoint", "pretrain", step, {"indices": indices})
        if run.stop.signum is not None:
            raise Stopped
    progress.close()


def online_schedule(cfg: Config) -> tuple[int, float]:
    """(updates per env step, std of the target-action noise): SO2's with --so2, else (1, 0)."""
    return (cfg.so2_utd, cfg.so2_sigma) if cfg.so2 else (1, 0.0)


def epoch_updates(cfg: Config, epoch_start: int, env_steps: int) -> int:
    """Updates owed to the epoch of env steps epoch_start+1 .. env_steps: utd per env step, times
    first_epoch_multiplier in the first epoch."""
    utd = online_schedule(cfg)[0]
    return (env_steps - epoch_start) * utd * (cfg.first_epoch_multiplier if epoch_start == 0 else 1)


def finetune(run: Run, dataset: ReplayBuffer, step: int, loop: Optional[dict]) -> None:
    """Online env steps step+1 .. online_steps, by epochs: epoch_steps env steps with the stochastic
    mixture policy from a reset, then the epoch's updates on prioritised batches over dataset +
    online rows (the budget cuts the last epoch). Each iteration below is one env step or one
    update, so a signal stops the run between any two; loop (None at the start) holds the online rows, the priorities,
    the running episode, the counters and the last losses."""
    cfg, agent, device = run.cfg, run.agent, run.device
    online = ReplayBuffer(cfg.online_steps, run.obs_dim, run.act_dim, device)
    n_data = dataset.size
    utd, sigma = online_schedule(cfg)
    # Priorities of [dataset rows | online rows]; a row's priority decides how often it is drawn.
    # float64, so that their cumulative sum over a million rows keeps the smallest ones.
    priority = torch.zeros(n_data + cfg.online_steps, dtype=torch.float64, device=device)
    env = make_env(parse_env_name(cfg.env)[0], run.dataset["id"])
    obs, _ = env.reset(seed=cfg.seed)
    if loop is None:
        agent.go_online()
        priority[:n_data] = 1.0
        max_priority = torch.tensor(
            initial_max_priority(n_data, cfg.init_online_fraction, cfg.epoch_steps), dtype=torch.float64, device=device
        )
        env_steps, updates, pending, epoch_start, losses = 0, 0, 0, 0, {}
        run.check("finetune", 0)
        run.write({"phase": "finetune", "step": 0, "env_steps": 0, **run.evaluate(agent)})
    else:
        online.load_state_dict(loop["online"])
        restore_env_state(env, loop["env"])
        priority[: n_data + online.size] = loop["priority"].to(device)
        max_priority = loop["max_priority"].to(device)
        env_steps, obs, updates, pending, epoch_start, losses = (
            step,
            *(loop[k] for k in ("obs", "updates", "pending", "epoch_start", "losses")),
        )
    obs_stage = torch.zeros(run.obs_dim, pin_memory=device.type == "cuda")
    progress = tqdm(
        total=cfg.online_steps,
        initial=env_steps,
        desc="finetune (Off2On + SO2)" if cfg.so2 else "finetune (Off2On)",
        unit="env step",
        mininterval=1,
    )
    while env_steps < cfg.online_steps or pending > 0:
        stepped = pending == 0
        if stepped:  # one env step of the running epoch
            with torch.no_grad():
                obs_stage.numpy()[:] = obs
                action = agent.actor(obs_stage.to(device)[None])[0][0].cpu().numpy()
            next_obs, reward, terminated, truncated, _ = env.step(action)
            # done = termination only; a time-limit truncation still bootstraps from next_obs.
            online.add(obs, action, reward, next_obs, float(terminated))
            priority[n_data + online.size - 1] = max_priority
            env_steps += 1
            progress.update(1)
            epoch_end = env_steps % cfg.epoch_steps == 0 or env_steps == cfg.online_steps
            # The release collects each epoch from a reset, so an epoch's last episode is cut there
            # (stored as it was: not a termination).
            obs = env.reset()[0] if terminated or truncated or epoch_end else next_obs
            if epoch_end:
                pending = epoch_updates(cfg, epoch_start, env_steps)
        else:  # one of the epoch's updates
            cumulative = priority[: n_data + online.size].cumsum(0)
            index = stratified_draw(cumulative, cfg.batch_size)
            from_online = index >= n_data
            batch = torch.where(
                from_online[:, None],
                online.rows[(index - n_data).clamp_min(0)],
                dataset.rows[index.clamp_max(n_data - 1)],
            )
            newest = max(online.size - cfg.online_buffer_size, 0)  # the density ratio's online window
            weight_rows = torch.cat(
                [
                    dataset.sample((cfg.weight_batch_size,)),
                    online.rows[torch.randint(newest, online.size, (cfg.weight_batch_size,), device=device)],
                ]
            )
            losses, new_priorities = agent.online_update(
                batch, weight_rows, online.split, policy_step=(updates + 1) % utd == 0, sigma=sigma
            )
            priority[index] = new_priorities.double()
            max_priority = torch.maximum(max_priority, new_priorities.max())
            losses["online_share"] = from_online.float().mean()
            run.watch(losses)
            updates, pending = updates + 1, pending - 1
            if pending == 0:
                if env_steps // cfg.eval_every > epoch_start // cfg.eval_every or env_steps == cfg.online_steps:
                    run.check("finetune", env_steps)
                    record = {
                        "phase": "finetune",
                        "step": updates,
                        "env_steps": env_steps,
                        **run.evaluate(agent),
                        **losses_record(losses),
                    }
                    run.write(record)
                    progress.set_postfix(score=f"{record['normalized_score']:.1f}")
                epoch_start = env_steps
        done = env_steps == cfg.online_steps and pending == 0
        if run.stop.signum is not None or (stepped and env_steps % cfg.checkpoint_every == 0) or done:
            loop = {
                "online": online.state_dict(),
                "priority": priority[: n_data + online.size].cpu(),
                "max_priority": max_priority.cpu(),
                "env": env_state(env),
                "obs": obs,
                "updates": updates,
                "pending": pending,
                "epoch_start": epoch_start,
                "losses": losses,
            }
            run.save("checkpoint", "finetune", env_steps, loop)
        if run.stop.signum is not None:
            raise Stopped
    progress.close()


def time_phases(run: Run, phase: str, step: int) -> list[tuple[str, int, float]]:
    """(phase, steps left, seconds per step) of the rest of the run, from updates timed on a copy of
    the agent with random rows (online: the mean over utd updates, one of them with the policy step)."""
    cfg, agent = run.cfg, copy.deepcopy(run.agent)
    fixed = torch.Generator(run.device).manual_seed(0)  # the rows must not draw from the run's RNG
    split = ReplayBuffer(1, run.obs_dim, run.act_dim, run.device).split
    width = 2 * run.obs_dim + run.act_dim + 2
    rows = torch.rand(cfg.num_agents, cfg.batch_size, width, device=run.device, generator=fixed)
    weight_rows = torch.rand(2 * cfg.weight_batch_size, width, device=run.device, generator=fixed)
    parts = []
    if phase == "pretrain" and cfg.pretrain_steps > step:
        update = lambda: agent.pretrain_update(rows, split, bc=False)  # noqa: E731
        parts.append(("pretraining", cfg.pretrain_steps - step, seconds_per_call(update, run.device, 3)))
    done = step if phase == "finetune" else 0
    if cfg.online_steps > done:
        utd, sigma = online_schedule(cfg)
        if not agent.online:
            agent.go_online()

        def updates() -> None:
            for k in range(utd):
                agent.online_update(rows[0], weight_rows, split, policy_step=k == utd - 1, sigma=sigma)

        # utd per env step left, and the first epoch's extra updates if it is not over (updates
        # still owed to the epoch of a resumed run are not counted)
        first = min(cfg.epoch_steps, cfg.online_steps)
        extra = (cfg.first_epoch_multiplier - 1) * first * utd if done < first else 0
        left = (cfg.online_steps - done) * utd + extra
        parts.append(("finetuning", left, seconds_per_call(updates, run.device, 1) / utd))
    return parts


def read_pretrained(cfg: Config) -> dict:
    """A finished pretraining (pretrain.pt) that fits this run; ConfigError otherwise."""
    saved = read_saved(Path(cfg.pretrained), "pretrain")
    config = saved["config"]
    if config["env"] != cfg.env:
        raise ConfigError(f"checkpoint '{cfg.pretrained}' was pretrained on {config['env']}, not {cfg.env}")
    saved_sizes = (tuple(config["hidden_dims"]), config["num_agents"])
    if saved_sizes != (tuple(cfg.hidden_dims), cfg.num_agents):
        raise ConfigError(
            f"checkpoint '{cfg.pretrained}' has hidden_dims {saved_sizes[0]} and {saved_sizes[1]} agents; this run has {cfg.hidden_dims} and {cfg.num_agents}"
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
    agent = Off2OnAgent(obs_dim, act_dim, cfg, device)
    if pretrained is not None:
        agent.load_state_dict(pretrained["agent"])
    first = ("pretrain", {"indices": None}) if pretrained is None else ("finetune", None)
    with open_run(cfg, checkpoint, agent, evaluate, device, data_info, first) as (run, phase, step, loop):
        print(
            f"run {run.dir}: dataset {dataset_id} ({len(arrays['rewards'])} transitions), Off2On ({cfg.num_agents} agents){' + SO2' if cfg.so2 else ''}, device {device}, {phase} from step {step}",
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
