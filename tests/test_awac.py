"""algorithms/awac.py: the AWAC rule on hand-checkable inputs (advantage weights and their clip,
the TD target without entropy, the order critic -> policy -> targets, the policy's log-likelihood),
fixed dataset state statistics, and end-to-end runs (AWAC + SERA with a mixing ratio; uniform
sampling from --pretrained)."""

import copy
import math

import pytest
import torch

from conftest import RESUME_ARGS, check_summary, finished_run, load_run_file, load_script, read_metrics

awac = load_script("algorithms/awac.py")


def test_weights_exp_advantage_over_lambda_clipped_not_normalised():
    q_data, q_policy = torch.tensor([1.0, 0.0, 10.0, -1.0]), torch.zeros(4)
    weights = awac.awac_weights(q_data, q_policy, 1.0, 100.0)
    assert torch.allclose(weights, torch.tensor([math.e, 1.0, 100.0, math.exp(-1)]))  # e^10 -> 100
    assert torch.allclose(awac.awac_weights(q_data, q_policy, 0.1, 100.0)[:2], torch.tensor([100.0, 1.0]))


def make_agent():
    cfg = awac.Config(hidden_dims=(8, 8), batch_size=4)
    stats = (torch.tensor([0.5, -1.0, 0.0]), torch.tensor([2.0, 1.0, 0.5]))
    torch.manual_seed(0)
    return awac.AWACAgent(3, 2, cfg, torch.device("cpu"), stats), cfg


def test_log_prob_is_the_unsquashed_gaussian_on_normalised_states():
    agent, _ = make_agent()
    obs, act = torch.tensor([[1.5, 0.0, 0.5]]), torch.tensor([[0.3, -0.9]])
    with torch.no_grad():
        agent.actor.net.log_std.copy_(torch.tensor([0.0, math.log(0.5)]))
        mean = agent.actor.net.mean((obs - agent.actor.mean) / agent.actor.std)
    by_hand = sum(
        -0.5 * ((act[0, i] - mean[0, i]) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)
        for i, s in enumerate((1.0, 0.5))
    )
    assert torch.allclose(agent.log_prob(obs, act), by_hand.reshape(1))


def test_update_critics_without_entropy_then_policy_with_the_new_critics():
    agent, cfg = make_agent()
    split = awac.ReplayBuffer(1, 3, 2, torch.device("cpu")).split
    torch.manual_seed(1)
    rows = torch.rand(4, 10) * 2 - 1
    rows[:, 9] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    obs, act, rew, next_obs, done = split(rows)
    expected = copy.deepcopy(agent)
    torch.manual_seed(7)
    out = agent.update(rows, split)
    torch.manual_seed(7)  # the same sampled actions, by hand
    with torch.no_grad():
        next_action = expected.actor(next_obs)[0]
        y = rew + cfg.gamma * (1 - done) * expected.target_critic(next_obs, next_action).min(0).values
    critic_loss = sum(((q - y) ** 2).mean() for q in expected.critic(obs, act))
    assert torch.allclose(out["critic_loss"], critic_loss.detach())
    expected.critic_optim.zero_grad()
    critic_loss.backward()
    expected.critic_optim.step()
    with torch.no_grad():
        q_policy = expected.critic(obs, expected.actor(obs)[0]).min(0).values
        weights = awac.awac_weights(expected.critic(obs, act).min(0).values, q_policy, 1.0, 100.0)
    assert torch.allclose(out["adv_weight"], weights.mean())
    assert torch.allclose(out["actor_loss"], -(weights * expected.log_prob(obs, act)).mean().detach())


@pytest.fixture(scope="module")
def sera_run(tmp_path_factory, datasets_root):
    """AWAC + SERA (mixing ratio 0.5) with the resume tests' tiny budget."""
    return finished_run("algorithms/awac.py", RESUME_ARGS["awac"], tmp_path_factory.mktemp("runs"), datasets_root)[0]


def test_end_to_end_with_sera(sera_run):
    records = read_metrics(sera_run)
    check_summary(sera_run, records)
    online = [r for r in records if r["phase"] == "finetune"]
    assert [r["step"] for r in records if r["phase"] == "pretrain"] == [100, 200, 300]
    assert [(r["env_steps"], r["step"]) for r in online] == [(e, max(e - 15, 0)) for e in range(0, 301, 60)]
    assert all(r["sera_reward"] is not None and r["adv_weight"] > 0 for r in online[1:])
    dataset = awac.load_dataset("walker2d", "random", 1500)[0]
    mean, std = awac.state_stats(dataset["observations"])
    final = load_run_file(sera_run / "final.pt")["agent"]
    for net in ("actor", "critic", "target_critic"):
        assert torch.equal(final[net]["mean"], mean) and torch.equal(final[net]["std"], std)


def test_uniform_sampling_from_the_pretraining(sera_run, tmp_path, datasets_root):
    args = [a for a in RESUME_ARGS["awac"] if a not in ("--sera", "--sera-k", "3", "--mixing-ratio", "0.5")]
    args += ["--pretrained", str(sera_run / "pretrain.pt"), "--online-steps", "60"]
    run_dir, result = finished_run("algorithms/awac.py", args, tmp_path, datasets_root)
    assert "finetune from step 0" in result.stderr
    records = read_metrics(run_dir)
    first = next(r for r in read_metrics(sera_run) if r["phase"] == "finetune")
    assert records[0]["return"] == first["return"]  # the pretrained policy
    assert [(r["env_steps"], r["step"]) for r in records] == [(0, 0), (60, 60)]
