"""algorithms/pex.py: the policy set's draw (Gumbel-max) against a direct softmax, the greedy pick, SO2's
perturbation of V's target and its update count (--so2), the frozen offline policy and the new
one, and end-to-end runs (PEX + SO2 as in the resume tests; plain PEX from --pretrained)."""

import copy
import math

import pytest
import torch

from conftest import RESUME_ARGS, check_summary, finished_run, load_run_file, load_script, read_metrics

pex = load_script("algorithms/pex.py")


def test_perturbed_action_clips_the_noise_then_the_action():
    action, noise = torch.tensor([[0.9, 0.0, -0.5]]), torch.tensor([[1.0, -5.0, 1.0]])
    assert torch.allclose(pex.perturbed_action(action, noise, 0.3, 0.6), torch.tensor([[1.0, -0.6, -0.2]]))


def make_agent(**overrides):
    cfg = pex.Config(hidden_dims=(8,), batch_size=4, **overrides)
    torch.manual_seed(0)
    return pex.PEXAgent(3, 2, cfg, torch.device("cpu")), cfg


def test_policy_set_draws_by_softmax_and_picks_greedily_when_deterministic():
    agent, cfg = make_agent()
    agent.expand()
    n = 20_000
    obs = torch.rand(n, 3)
    # Q of the offline proposal 0, of the new one 0.1: p(new) = e^1 / (1 + e^1) at inverse temperature 10
    agent.critic = lambda o, a: torch.tensor([0.0, 0.1]).repeat(len(o) // 2).expand(2, -1)
    offline_mode = agent.policy(obs, True)[0]
    with torch.no_grad():
        action = agent.actor(obs)[0]
        greedy = agent.actor(obs, deterministic=True)[0]
    from_offline = (action == offline_mode).all(-1).float().mean().item()
    # against a direct softmax: p(new) = softmax(10 * [0, 0.1])[1] = e / (1 + e)
    expected = torch.softmax(10 * torch.tensor([0.0, 0.1]), 0)[1].item()
    assert math.isclose(expected, math.e / (1 + math.e), rel_tol=1e-6)
    assert abs((1 - from_offline) - expected) < 0.015
    assert torch.equal(greedy, agent.new_policy(obs, True)[0])  # the higher-Q proposal, both modes


def test_so2_perturbs_the_action_of_the_value_target():
    agent, cfg = make_agent()
    split = pex.ReplayBuffer(1, 3, 2, torch.device("cpu")).split
    torch.manual_seed(1)
    rows = torch.rand(4, 10) * 2 - 1
    obs, act = split(rows)[:2]
    plain, perturbed = copy.deepcopy(agent), copy.deepcopy(agent)
    with torch.no_grad():
        v = agent.value(obs)
        q_data = agent.target_critic(obs, act).min(0).values
    out = plain.update(rows, split, policy_step=False)
    assert torch.allclose(out["value_loss"], pex.expectile_loss(q_data - v, cfg.expectile))
    torch.manual_seed(5)
    out = perturbed.update(rows, split, policy_step=False, sigma=0.3)
    torch.manual_seed(5)
    with torch.no_grad():
        noisy = pex.perturbed_action(act, torch.randn_like(act), 0.3, 0.6)
        q_noisy = agent.target_critic(obs, noisy).min(0).values
    assert not torch.allclose(q_noisy, q_data)
    assert torch.allclose(out["value_loss"], pex.expectile_loss(q_noisy - v, cfg.expectile))
    assert set(out) == {"critic_loss", "value_loss"}  # no policy step


@pytest.fixture(scope="module")
def so2_run(tmp_path_factory, datasets_root):
    """PEX + SO2 (2 updates per env step) with the resume tests' tiny budget."""
    return finished_run("algorithms/pex.py", RESUME_ARGS["pex"], tmp_path_factory.mktemp("runs"), datasets_root)[0]


def test_end_to_end_with_so2(so2_run):
    records = read_metrics(so2_run)
    check_summary(so2_run, records)
    online = [r for r in records if r["phase"] == "finetune"]
    # 50 collection steps, then so2_utd = 2 V/Q updates per env step
    assert [(r["env_steps"], r["step"]) for r in online] == [(e, 2 * max(e - 50, 0)) for e in range(0, 301, 60)]
    assert all(r["actor_lr"] == 3e-4 for r in online[1:])
    pretrained = load_run_file(so2_run / "pretrain.pt")["agent"]
    final = load_run_file(so2_run / "final.pt")["agent"]
    # the offline policy is frozen from the expansion on; the new policy and the critics learned
    assert all(torch.equal(final["actor"][k], pretrained["actor"][k]) for k in pretrained["actor"])
    assert not all(torch.equal(final["new_actor"][k], pretrained["new_actor"][k]) for k in pretrained["new_actor"])
    assert not all(torch.equal(final["critic"][k], pretrained["critic"][k]) for k in pretrained["critic"])
    assert final["expanded"] and not pretrained["expanded"]


def test_plain_pex_from_the_pretraining(so2_run, tmp_path, datasets_root):
    assert RESUME_ARGS["pex"][-3:] == ["--so2", "--so2-utd", "2"]
    args = RESUME_ARGS["pex"][:-3] + ["--pretrained", str(so2_run / "pretrain.pt"), "--online-steps", "120"]
    run_dir, result = finished_run("algorithms/pex.py", args, tmp_path, datasets_root)
    assert "PEX, device" in result.stderr and "finetune from step 0" in result.stderr
    records = read_metrics(run_dir)
    first = next(r for r in read_metrics(so2_run) if r["phase"] == "finetune")
    assert records[0]["return"] == first["return"]  # the same expanded policy set at the start
    assert [(r["env_steps"], r["step"]) for r in records] == [(0, 0), (60, 10), (120, 70)]  # one per env step
