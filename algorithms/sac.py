"""SAC from scratch: the SO2 paper's online baseline, and the trainer of behaviour policies.

Paper: Haarnoja et al., "Soft Actor-Critic Algorithms and Applications" (arXiv 1812.05905):
tanh-Gaussian actor, twin Q critics with a clipped double-Q soft target, automatic temperature
toward entropy -|A|, one gradient step per env step after a uniform-random warm-up. Used here as
(1) the "SAC from scratch" comparison of the SO2 paper (its Fig. 7, e.g. HalfCheetah), and
(2) the trainer of the behaviour policies behind the D4RL-style datasets of
scripts/make_dataset.py (`--stop-score` ends training at a target deterministic score).

Deliberate differences from the paper and common implementations:
  - networks are 2x256 ReLU (as in the paper and CleanRL); actor init and log-std clip [-5, 2]
    follow the other files of this project (EDAC), so one Actor class serves everywhere.
  - evaluation is batched (all episodes together, fixed seeded start states) and reports the
    same Q diagnostics as algorithms/so2.py (the paper uses online SAC as its Q reference).
  - checkpoints hold the whole training state (networks, optimisers, temperature, replay buffer,
    RNG states and the exact MuJoCo state of the running episode), so a resumed run ends in the
    same state as an uninterrupted one (on CPU: bit for bit).
  - gymnasium 1.x semantics: done = terminated; a time-limit truncation bootstraps from the real
    final observation, which env.step returns before the manual reset.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import tyro
import yaml
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclass
class Config:
    env: str = "halfcheetah"
    """Environment: halfcheetah, hopper, walker2d or ant (gymnasium v5 MuJoCo)."""
    seed: int = 0
    """Seed of torch, numpy and the environments; same seed on CPU gives identical runs."""
    device: str = "auto"
    """Torch device: 'auto' picks cuda when available, else cpu."""
    total_steps: int = 1_000_000
    """Env steps (one gradient step per env step after learning_starts)."""
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
    """Adam learning rate of the actor and the temperature."""
    critic_lr: float = 3e-4
    """Adam learning rate of the critics."""
    eval_every: int = 10_000
    """Evaluate every this many env steps (and at the end)."""
    eval_episodes: int = 10
    """Evaluation episodes, run together with one batched policy forward per step."""
    stop_score: Optional[float] = None
    """Stop once an evaluation's normalised score reaches this (e.g. a 'medium' policy)."""
    checkpoint_every: int = 50_000
    """Save the whole training state every this many env steps (and at the end / on Ctrl-C)."""
    resume: Optional[str] = None
    """Run folder to resume from its checkpoint.pt; its config is the default, flags override it
    (e.g. a larger --total-steps continues a finished run)."""
    kendall_windows: int = 10
    """M: each evaluation episode is cut into M consecutive windows for Kendall's tau."""
    mc_tail_steps: int = 460
    """Q diagnostics skip the last steps of a time-limit-truncated evaluation episode, whose
    Monte-Carlo return misses the cut-off tail (0.99^460 < 1%)."""
    out_dir: str = "runs"
    """Runs are written to <out_dir>/<env>__sac__<seed>__<unix time>/."""
    track: bool = False
    """Log to Weights & Biases (works with WANDB_MODE=offline)."""
    wandb_project: str = "so2"
    """W&B project name."""


class ConfigError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


def fail(message: str) -> None:
    print(f"sac.py: error: {message}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------------------------
# Environment and scores
# ----------------------------------------------------------------------------------------------
GYM_IDS = {"halfcheetah": "HalfCheetah-v5", "hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "ant": "Ant-v5"}
# D4RL reference returns (random, expert) that define the normalised score.
REF_SCORES = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}
MJ_STATE = mujoco.mjtState.mjSTATE_INTEGRATION  # everything mj_step reads, warm-start included


def normalized_score(env: str, returns):
    low, high = REF_SCORES[env]
    return 100.0 * (np.asarray(returns) - low) / (high - low)


def make_env(env: str) -> gym.Env:
    return gym.make(GYM_IDS[env])


def env_state(env: gym.Env) -> dict:
    """The running episode exactly: MuJoCo integration state, time-limit counter, env RNG."""
    u = env.unwrapped
    state = np.empty(mujoco.mj_stateSize(u.model, MJ_STATE))
    mujoco.mj_getState(u.model, u.data, state, MJ_STATE)
    return {"mujoco": state, "elapsed_steps": env._elapsed_steps, "np_random": u.np_random.bit_generator.state}


def restore_env_state(env: gym.Env, saved: dict) -> None:
    u = env.unwrapped
    mujoco.mj_setState(u.model, u.data, saved["mujoco"], MJ_STATE)
    mujoco.mj_forward(u.model, u.data)
    env._elapsed_steps = saved["elapsed_steps"]
    u.np_random.bit_generator.state = saved["np_random"]


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

    def add(self, obs, action, reward, next_obs, done) -> None:
        for k, value in enumerate((obs, action, reward, next_obs, done)):
            self.stage_np[self.offsets[k] : self.offsets[k + 1]] = value
        self.rows[self.ptr].copy_(self.stage)  # blocking: the staging row is rewritten next step
        self.ptr, self.size = (self.ptr + 1) % self.capacity, min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> torch.Tensor:
        return self.rows[torch.randint(0, self.size, (batch_size,), device=self.rows.device)]

    def split(self, batch: torch.Tensor):
        """Rows -> (obs, action, reward, next_obs, done), reward and done without the last dim."""
        obs, act, rew, next_obs, done = torch.split(batch, self.sizes, dim=-1)
        return obs, act, rew.squeeze(-1), next_obs, done.squeeze(-1)

    def state_dict(self) -> dict:
        return {"rows": self.rows[: self.size].cpu(), "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.ptr = len(state["rows"]), state["ptr"]
        self.rows[: self.size] = state["rows"].to(self.rows.device)


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
class Actor(nn.Module):
    """Tanh-Gaussian policy, 2x256 ReLU trunk, log-std clipped to [-5, 2]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mu = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)
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
        log_std = self.log_std(h).clamp(-5.0, 2.0)
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
# Losses and updates
# ----------------------------------------------------------------------------------------------
def soft_target(reward, done, next_q, next_log_prob, alpha, gamma: float) -> torch.Tensor:
    """Clipped double-Q soft target: r + gamma (1 - d) (min_i Q_i(s', a') - alpha log pi(a'|s'))."""
    return reward + gamma * (1.0 - done) * (next_q.min(0).values - alpha * next_log_prob)


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


class SACAgent:
    """Actor, twin critics, targets, temperature and their optimisers."""

    def __init__(self, obs_dim: int, act_dim: int, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.actor = Actor(obs_dim, act_dim, cfg.hidden_dim).to(device)
        self.critic = VectorizedCritic(obs_dim, act_dim, cfg.hidden_dim).to(device)
        self.target_critic = VectorizedCritic(obs_dim, act_dim, cfg.hidden_dim).to(device)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_critic.requires_grad_(False)
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)
        self.target_entropy = -float(act_dim)
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.alpha_optim = torch.optim.Adam([self.log_alpha], lr=cfg.actor_lr)

    def state_dict(self) -> dict:
        return {
            "actor": self.actor.state_dict(), "critic": self.critic.state_dict(), "target_critic": self.target_critic.state_dict(),
            "log_alpha": self.log_alpha.detach().cpu(), "actor_optim": self.actor_optim.state_dict(),
            "critic_optim": self.critic_optim.state_dict(), "alpha_optim": self.alpha_optim.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("actor", "critic", "target_critic", "actor_optim", "critic_optim", "alpha_optim"):
            getattr(self, name).load_state_dict(state[name])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])

    def update(self, batch: torch.Tensor, split) -> dict[str, torch.Tensor]:
        """One SAC step: critics, then actor, then temperature, then targets."""
        obs, act, rew, next_obs, done = split(batch)
        alpha = self.log_alpha.detach().exp()
        with torch.no_grad():
            next_action, next_log_prob = self.actor(next_obs)
            y = soft_target(rew, done, self.target_critic(next_obs, next_action), next_log_prob, alpha, self.cfg.gamma)
        critic_loss = (self.critic(obs, act) - y).pow(2).mean(1).sum()
        self.critic_optim.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_optim.step()

        action, log_prob = self.actor(obs)
        actor_loss = (alpha * log_prob - self.critic(obs, action).min(0).values).mean()
        self.actor_optim.zero_grad(set_to_none=True)
        actor_loss.backward(inputs=list(self.actor.parameters()))  # critic weights get no gradient
        self.actor_optim.step()

        alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
        self.alpha_optim.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_optim.step()
        soft_update(self.target_critic, self.critic, self.cfg.tau)
        return {"critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(), "alpha": alpha}


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
    """The SO2 paper's rank metric for one episode: cut the state-action pairs into `windows`
    consecutive windows and compute Kendall's tau between estimated and true Q in each."""
    taus = [kendall_tau(a, b) for a, b in zip(np.array_split(q_est, windows), np.array_split(q_true, windows)) if len(a) > 1]
    return [t for t in taus if not math.isnan(t)]


class Evaluator:
    """Runs eval_episodes episodes together (one batched deterministic policy forward per step)
    and computes the normalised score and the Q diagnostics on the collected rollouts. Every
    evaluation starts from the same seeded initial states, so scores compare across evaluations
    and runs; it draws nothing from the training RNG."""

    def __init__(self, env: str, cfg: Config, device: torch.device):
        self.env_name, self.cfg, self.device = env, cfg, device
        self.envs = [make_env(env) for _ in range(cfg.eval_episodes)]
        self.seeds = [cfg.seed * 1000 + 500 + i for i in range(cfg.eval_episodes)]

    @torch.no_grad()
    def __call__(self, agent: SACAgent) -> dict[str, float]:
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
        result = {"return": float(returns.mean()), "return_std": float(returns.std()), "normalized_score": float(normalized_score(self.env_name, returns).mean())}
        result.update(self.q_diagnostics(agent, episodes))
        return result

    def q_diagnostics(self, agent: SACAgent, episodes: list[dict]) -> dict[str, float]:
        obs, act, q_true, lengths = [], [], [], []
        for ep in episodes:
            n = len(ep["rew"]) if ep["terminated"] else max(len(ep["rew"]) - self.cfg.mc_tail_steps, 0)
            if n == 0:
                continue
            obs.append(np.asarray(ep["obs"][:n]))
            act.append(np.asarray(ep["act"][:n]))
            q_true.append(discounted_returns(np.asarray(ep["rew"]), self.cfg.gamma)[:n])
            lengths.append(n)
        nan = float("nan")
        if not lengths:
            return {"q_bias": nan, "q_bias_min": nan, "kendall_tau": nan, "q_true": nan, "q_std_policy": nan, "q_std_random": nan}
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
        random_actions = torch.as_tensor(rng.uniform(-1, 1, tuple(act_t.shape)), dtype=torch.float32, device=self.device)
        return {
            "q_bias": float((q_mean.mean() - q_true_all.mean()) / scale) if scale > 0 else nan,
            "q_bias_min": float((q_min.mean() - q_true_all.mean()) / scale) if scale > 0 else nan,
            "kendall_tau": float(np.mean(taus)) if taus else nan,
            "q_true": float(q_true_all.mean()),
            "q_std_policy": float(q_members.std(0).mean()),  # on the evaluated policy's actions
            "q_std_random": float(agent.critic(obs_t, random_actions).std(0).mean()),
        }


# ----------------------------------------------------------------------------------------------
# Train loop
# ----------------------------------------------------------------------------------------------
class RunLog:
    """metrics.jsonl (one record per evaluation), optional wandb, and the records themselves."""

    def __init__(self, run_dir: Path, cfg: Config, run_name: str, records: list[dict]):
        self.path = run_dir / "metrics.jsonl"
        self.records = list(records)
        # On resume the file is rewritten from the checkpoint: records after it are dropped.
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self.wandb = None
        if cfg.track:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, name=run_name, id=run_name, resume="allow", config=asdict(cfg), dir=str(run_dir))

    def write(self, record: dict) -> None:
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def resolve_config(cfg: Config) -> Config:
    """Check every value; ConfigError if bad."""
    checks = [
        (cfg.env in GYM_IDS, f"unknown env '{cfg.env}'; expected one of {', '.join(GYM_IDS)}"),
        (cfg.total_steps >= 1, "total_steps must be >= 1"), (cfg.learning_starts >= 0, "learning_starts must be >= 0"),
        (cfg.buffer_size >= 1 and cfg.batch_size >= 1, "buffer_size and batch_size must be >= 1"),
        (cfg.eval_every >= 1 and cfg.eval_episodes >= 1, "eval_every and eval_episodes must be >= 1"),
        (cfg.checkpoint_every >= 1, "checkpoint_every must be >= 1"), (cfg.hidden_dim >= 1, "hidden_dim must be >= 1"),
        (0 < cfg.gamma <= 1 and 0 < cfg.tau <= 1, "gamma and tau must be in (0, 1]"),
        (min(cfg.actor_lr, cfg.critic_lr) > 0, "learning rates must be > 0"),
        (cfg.kendall_windows >= 1 and cfg.mc_tail_steps >= 0, "kendall_windows must be >= 1 and mc_tail_steps >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.device != "auto":
        try:
            torch.empty(0, device=cfg.device)
        except (RuntimeError, AssertionError) as exc:
            raise ConfigError(f"device '{cfg.device}' is not usable: {str(exc).splitlines()[0]}")
    return cfg


def load_checkpoint(run_dir: str) -> dict:
    path = Path(run_dir) / "checkpoint.pt"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        Config(**checkpoint["config"])
    except Exception as exc:
        raise ConfigError(f"cannot resume from '{run_dir}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return checkpoint


def parse_args(argv: list[str]) -> tuple[Config, Optional[dict]]:
    """tyro CLI; with --resume the saved config is the default that the other flags override."""
    cfg = tyro.cli(Config, args=argv)
    if cfg.resume is None:
        return cfg, None
    checkpoint = load_checkpoint(cfg.resume)
    cfg = tyro.cli(Config, args=argv, default=replace(Config(**checkpoint["config"]), resume=cfg.resume))
    return cfg, checkpoint


def train(cfg: Config, checkpoint: Optional[dict]) -> Path:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    env = make_env(cfg.env)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    evaluate = Evaluator(cfg.env, cfg, device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    agent = SACAgent(obs_dim, act_dim, cfg, device)
    buffer = ReplayBuffer(cfg.buffer_size, obs_dim, act_dim, device)
    obs, _ = env.reset(seed=cfg.seed)
    # Host staging row for the policy input: filled in place each env step, no new tensor.
    obs_stage = torch.zeros(obs_dim, pin_memory=device.type == "cuda")
    start_step, wall_before, records = 1, 0.0, []
    if checkpoint is None:
        run_dir = Path(cfg.out_dir) / f"{cfg.env}__sac__{cfg.seed}__{int(time.time())}"
        run_dir.mkdir(parents=True, exist_ok=False)
    else:
        run_dir = Path(cfg.resume)
        agent.load_state_dict(checkpoint["agent"])
        buffer.load_state_dict(checkpoint["buffer"])
        restore_env_state(env, checkpoint["env"])
        obs = checkpoint["obs"]
        torch.set_rng_state(checkpoint["torch_rng"])
        if device.type == "cuda" and checkpoint["cuda_rng"] is not None:
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
        start_step, wall_before, records = checkpoint["step"] + 1, checkpoint["wall_time_s"], checkpoint["records"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**asdict(cfg), "device_resolved": str(device)}, sort_keys=False))
    log = RunLog(run_dir, cfg, run_dir.name, records)
    print(f"run {run_dir}: {GYM_IDS[cfg.env]}, steps {start_step}..{cfg.total_steps}, device {device}", file=sys.stderr)

    def save(step: int) -> None:
        atomic_save({
            "agent": agent.state_dict(), "buffer": buffer.state_dict(), "env": env_state(env), "obs": obs, "step": step,
            "torch_rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "records": log.records, "config": asdict(cfg), "wall_time_s": wall_before + time.time() - start,
        }, run_dir / "checkpoint.pt")

    # Ctrl-C / SIGTERM only raise a flag; the step in progress completes, then the state is saved,
    # so --resume continues exactly where the run stopped.
    interrupted = []
    previous_handlers = {sig: signal.signal(sig, lambda *_: interrupted.append(True)) for sig in (signal.SIGINT, signal.SIGTERM)}
    start = time.time()
    losses, stopped, step = {}, False, start_step - 1
    progress = tqdm(range(start_step, cfg.total_steps + 1), desc=f"SAC {cfg.env}", unit="step", mininterval=1, initial=start_step - 1, total=cfg.total_steps)
    for step in progress:
        with torch.no_grad():
            if step <= cfg.learning_starts:
                action = (torch.rand(act_dim) * 2 - 1).numpy()
            else:
                obs_stage.numpy()[:] = obs
                action = agent.actor(obs_stage.to(device)[None])[0][0].cpu().numpy()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        # done = termination only; a time-limit truncation still bootstraps from next_obs.
        buffer.add(obs, action, reward, next_obs, float(terminated))
        obs = env.reset()[0] if terminated or truncated else next_obs
        if step > cfg.learning_starts:
            losses = agent.update(buffer.sample(cfg.batch_size), buffer.split)
        if step % cfg.eval_every == 0 or step == cfg.total_steps:
            record = {"phase": "online", "step": step, "env_steps": step, **evaluate(agent), **{k: float(v) for k, v in losses.items()}}
            log.write(record)
            progress.set_postfix(score=f"{record['normalized_score']:.1f}")
            stopped = cfg.stop_score is not None and record["normalized_score"] >= cfg.stop_score
        if stopped or interrupted or step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
            save(step)
        if interrupted:
            log.close()
            print(f"interrupted at step {step}; resume with: python algorithms/sac.py --resume {run_dir}", file=sys.stderr)
            sys.exit(130)
        if stopped:
            break
    for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)
    torch.save(agent.actor.state_dict(), run_dir / "actor.pt")
    scores = [r["normalized_score"] for r in log.records]
    summary = {
        "env": cfg.env, "seed": cfg.seed, "env_steps": step, "stopped_at_score": cfg.stop_score if stopped else None,
        "final_score": scores[-1], "final_return": log.records[-1]["return"], "best_score": max(scores),
        "wall_time_s": round(wall_before + time.time() - start, 1), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch_version": torch.__version__,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.close()
    return run_dir


def main(argv: Optional[list[str]] = None) -> None:
    try:
        cfg, checkpoint = parse_args(sys.argv[1:] if argv is None else argv)
        run_dir = train(resolve_config(cfg), checkpoint)
    except ConfigError as exc:
        fail(str(exc))
    print(f"done: {run_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
