"""Time one gradient update of algorithms/so2.py per phase, against a straightforward baseline.

Prints one JSON line per phase:
  {"phase": "pretrain"|"finetune", "num_critics", "batch_size", "device", "ms_per_update",
   "baseline_ms_per_update", "speedup"}
The baseline is the usual way of writing the same update (as in CORL's EDAC): state and action
repeated N times into a batched matmul, a second critic forward for the diversity loss with a
masked N x N Gram matrix, separate policy samples for the alpha and actor losses, the actor loss
back-propagated into the critic too, and a python-loop soft update. Both run on the same
synthetic batch, interleaved, so machine noise affects them alike; report the ratio.

  python scripts/bench_updates.py --num-critics 10 --batch-size 256 --device cpu --steps 50
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Literal

import torch
import tyro

from common import load_algorithm, time_updates

so2 = load_algorithm("so2")


@dataclass
class Args:
    num_critics: int = 10
    """Ensemble size N."""
    batch_size: int = 256
    """Transitions per update (pretraining batch; finetuning uses batch_size per critic update)."""
    device: str = "cpu"
    """Torch device."""
    steps: int = 50
    """Timed updates per method and phase (after 5 warm-up updates)."""
    phases: tuple[Literal["pretrain", "finetune"], ...] = ("pretrain", "finetune")
    """Which phases to time."""
    obs_dim: int = 17
    """Observation size (17: Walker2d / HalfCheetah)."""
    act_dim: int = 6
    """Action size (6: Walker2d / HalfCheetah)."""


def naive_critic(critic, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Inputs repeated per member and concatenated, then a bmm per layer."""
    n = critic.num_critics
    x = torch.cat([obs, action], -1)
    x = x.unsqueeze(0).repeat_interleave(n, 0) if x.dim() == 2 else x
    for i, (w, b) in enumerate(zip(critic.weights, critic.biases)):
        x = x @ w + b
        if i < len(critic.weights) - 1:
            x = torch.relu(x)
    return x.squeeze(-1)


def naive_pretrain_step(agent, batch: torch.Tensor, split) -> None:
    cfg, n = agent.cfg, agent.cfg.num_critics
    obs, act, rew, next_obs, done = split(batch)
    with torch.no_grad():
        _, log_prob = agent.actor(obs)
    alpha_loss = -(agent.log_alpha * (log_prob + agent.target_entropy)).mean()
    agent.alpha_optim.zero_grad()
    alpha_loss.backward()
    agent.alpha_optim.step()
    alpha = agent.log_alpha.exp().detach()

    action, log_prob = agent.actor(obs)
    actor_loss = (alpha * log_prob - naive_critic(agent.critic, obs, action).min(0).values).mean()
    agent.actor_optim.zero_grad()
    actor_loss.backward()
    agent.actor_optim.step()

    with torch.no_grad():
        next_action, next_log_prob = agent.actor(next_obs)
        q_next = naive_critic(agent.target_critic, next_obs, next_action).min(0).values - alpha * next_log_prob
        y = rew + cfg.gamma * (1 - done) * q_next
    critic_loss = (naive_critic(agent.critic, obs, act) - y).pow(2).mean(1).sum()
    obs_rep = obs.unsqueeze(0).repeat_interleave(n, 0)
    act_rep = act.unsqueeze(0).repeat_interleave(n, 0).requires_grad_(True)
    q = naive_critic(agent.critic, obs_rep, act_rep)
    grads = torch.autograd.grad(q.sum(), act_rep, retain_graph=True, create_graph=True)[0]
    grads = (grads / (grads.norm(dim=2, keepdim=True) + 1e-10)).transpose(0, 1)
    gram = (grads @ grads.transpose(1, 2)) * (1 - torch.eye(n, device=batch.device))
    critic_loss = critic_loss + cfg.eta * gram.sum((1, 2)).mean() / (n - 1)
    naive_critic_step(agent, critic_loss)


def naive_finetune_step(agent, batch: torch.Tensor, split, alpha: float) -> None:
    """The SO2 critic update written with repeated inputs and a python-loop soft update."""
    cfg = agent.cfg
    obs, act, rew, next_obs, done = split(batch)
    with torch.no_grad():
        next_action, next_log_prob = agent.actor(next_obs)
        noise = (torch.randn_like(next_action) * cfg.sigma).clamp(-cfg.noise_clip, cfg.noise_clip)
        q_next = naive_critic(agent.target_critic, next_obs, (next_action + noise).clamp(-1, 1))
        y = rew + cfg.gamma * (1 - done) * (q_next - alpha * next_log_prob)
    naive_critic_step(agent, (naive_critic(agent.critic, obs, act) - y).pow(2).mean(1).sum())


def naive_critic_step(agent, critic_loss: torch.Tensor) -> None:
    """Optimiser step, then the soft update as a python loop over parameters."""
    agent.critic_optim.zero_grad()
    critic_loss.backward()
    agent.critic_optim.step()
    with torch.no_grad():
        for target, source in zip(agent.target_critic.parameters(), agent.critic.parameters()):
            target.data.copy_((1 - agent.cfg.tau) * target.data + agent.cfg.tau * source.data)


def main(args: Args) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = replace(so2.Config(), num_critics=args.num_critics, eta=1.0)
    agent = so2.SO2Agent(args.obs_dim, args.act_dim, cfg, device)
    buffer = so2.ReplayBuffer(4096, args.obs_dim, args.act_dim, device)
    rows = torch.randn(4096, sum(buffer.sizes))
    rows[:, buffer.offsets[1] : buffer.offsets[2]].clamp_(-0.99, 0.99)  # actions inside the bounds
    rows[:, -1] = (torch.rand(4096) < 0.05).float()
    buffer.extend(rows)
    batch = buffer.sample((args.batch_size,))
    methods = {
        "pretrain": (
            lambda: agent.pretrain_step(batch, buffer.split),
            lambda: naive_pretrain_step(agent, batch, buffer.split),
        ),
        "finetune": (
            lambda: agent.finetune_critic_step(batch, buffer.split, 0.2),
            lambda: naive_finetune_step(agent, batch, buffer.split, 0.2),
        ),
    }
    for phase in args.phases:
        fast, naive = methods[phase]
        # Interleave rounds so drift in machine load hits both methods alike.
        fast_ms, naive_ms = [], []
        for _ in range(3):
            fast_ms.append(time_updates(fast, args.steps, device))
            naive_ms.append(time_updates(naive, args.steps, device))
        fast_best, naive_best = min(fast_ms), min(naive_ms)
        print(
            json.dumps(
                {
                    "phase": phase,
                    "num_critics": args.num_critics,
                    "batch_size": args.batch_size,
                    "device": str(device),
                    "ms_per_update": round(fast_best, 3),
                    "baseline_ms_per_update": round(naive_best, 3),
                    "speedup": round(naive_best / fast_best, 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(tyro.cli(Args))
