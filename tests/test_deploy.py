"""Deployment and ecosystem fit: SB3 evaluate_policy on real VecEnvs, Gymnasium loops, export, CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import DummyVecEnv

from ipd_agent import IPDPolicy

from conftest import FIT_KW


@pytest.fixture(params=["one policy", "three members"])
def deployed(request, fitted, members3):
    """Every deployment path holds for a single policy and for ``transformer.n_members=3`` (median of members)."""
    return fitted if request.param == "one policy" else members3


@pytest.mark.parametrize("n_envs", [1, 4])
def test_sb3_evaluate_policy_on_dummy_vec_env(fitted, n_envs):
    venv = make_vec_env("Hopper-v5", n_envs=n_envs, seed=0, vec_env_cls=DummyVecEnv,
                        env_kwargs={"max_episode_steps": 60})
    policy = fitted.algo.as_policy(venv.action_space)
    rewards, lengths = evaluate_policy(policy, venv, n_eval_episodes=4, deterministic=True, return_episode_rewards=True)
    assert len(rewards) == 4 and all(np.isfinite(rewards)) and all(0 < n <= 60 for n in lengths)
    venv.close()


def test_vec_policy_keeps_one_context_per_env_and_matches_single_env_policies(deployed):
    """4 envs stepped together give exactly the actions of 4 separate single-env policies, resets included."""
    envs = [gym.make("Hopper-v5") for _ in range(4)]
    obs = np.stack([e.reset(seed=i)[0] for i, e in enumerate(envs)])
    batched = IPDPolicy(deployed.algo, envs[0].action_space)
    singles = [IPDPolicy(deployed.algo, envs[0].action_space) for _ in range(4)]
    starts = np.ones(4, dtype=bool)
    for t in range(40):
        a_b, state = batched.predict(obs, episode_start=starts)
        assert a_b.shape == (4, 3) and a_b.dtype == envs[0].action_space.dtype and state is None
        a_s = np.stack([p.predict(obs[i], episode_start=bool(starts[i]))[0] for i, p in enumerate(singles)])
        np.testing.assert_allclose(a_b, a_s, atol=1e-5)
        nxt, starts = [], np.zeros(4, dtype=bool)
        for i, e in enumerate(envs):
            o, _, te, tr, _ = e.step(a_b[i])
            if te or tr:
                o, _ = e.reset()
                starts[i] = True
            nxt.append(o)
        obs = np.stack(nxt)


def test_single_observation_returns_action_shaped_like_the_space(fitted):
    env = gym.make("Hopper-v5")
    policy = fitted.algo.as_policy(env.action_space)
    obs, _ = env.reset(seed=0)
    action, _ = policy.predict(obs, episode_start=True)
    assert action.shape == env.action_space.shape and env.action_space.contains(action)


def test_plain_gymnasium_loop_with_saved_policy(deployed):
    env = gym.make("Hopper-v5", max_episode_steps=50)
    policy = IPDPolicy.load(deployed.path, env.action_space)
    in_memory = deployed.algo.as_policy(env.action_space)
    obs, _ = env.reset(seed=3)
    done, steps, start, actions = False, 0, True, []
    while not done:
        a, _ = policy.predict(obs, episode_start=start)
        b, _ = in_memory.predict(obs, episode_start=start)
        np.testing.assert_allclose(a, b, atol=1e-6)  # the file deploys exactly the fitted policy
        assert env.action_space.contains(a)
        obs, _, te, tr, _ = env.step(a)
        done, start, steps = te or tr, False, steps + 1
        actions.append(a)
    assert steps == 50 or te  # ran until the time limit or a real termination
    assert np.ptp(np.stack(actions), axis=0).max() > 0  # the actions respond to the state


@pytest.mark.parametrize("fmt", ["onnx", "pt"])
def test_export_matches_predict_over_a_whole_episode(deployed, tmp_path, fmt):
    """The exported policy (transformer + value network; every member and the median) reproduces the stateful policy
    within 1e-4, including steps after the context window is full (the episode runs past context_size)."""
    algo = deployed.algo
    path = str(tmp_path / f"policy.{fmt}")
    algo.save_policy(path)
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(path)
        run = lambda o, a: sess.run(None, {"observations": o, "actions": a})[0]  # noqa: E731
    else:
        mod = torch.jit.load(path)
        run = lambda o, a: mod(torch.from_numpy(o), torch.from_numpy(a)).detach().numpy()  # noqa: E731
    k = algo.config.context_size
    wrapper = algo.as_stateful_wrapper()
    env = gym.make("Hopper-v5", max_episode_steps=3 * k)
    obs, _ = env.reset(seed=0)
    hist_o, hist_a, worst, steps = [], [], 0.0, 0
    done = False
    while not done:
        a = wrapper.predict(obs, 0.0)
        hist_o.append(obs.astype(np.float32))
        hist_a.append(np.zeros(3, np.float32))
        a_exp = run(np.array(hist_o[-k:]), np.array(hist_a[-k:]))
        worst = max(worst, float(np.abs(a_exp - a).max()))
        hist_a[-1] = a
        obs, _, te, tr, _ = env.step(a)
        done, steps = te or tr, steps + 1
    assert worst < 1e-4
    assert steps > k or te, "the episode must either fill the context window or end in a real termination"


def test_export_needs_neither_d3rlpy_nor_ipd_agent(fitted, tmp_path):
    path = str(tmp_path / "policy.onnx")
    fitted.algo.save_policy(path)
    code = ("import sys; sys.modules['d3rlpy'] = None; sys.modules['ipd_agent'] = None\n"
            "import numpy as np, onnxruntime as ort\n"
            f"s = ort.InferenceSession({path!r})\n"
            "a = s.run(None, {'observations': np.zeros((3, 11), np.float32), 'actions': np.zeros((3, 3), np.float32)})[0]\n"
            "print(a.shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "(3,)" in out.stdout


def test_save_policy_rejects_unknown_format(fitted, tmp_path):
    with pytest.raises(ValueError, match=r"\.pt .*\.onnx"):
        fitted.algo.save_policy(str(tmp_path / "policy.zip"))


def test_d3rlpy_file_and_tensorboard_loggers(loaded_copy, fitted, tmp_path):
    import d3rlpy

    pytest.importorskip("tensorboardX")
    kw = dict(FIT_KW, logger_adapter=d3rlpy.logging.TensorboardAdapterFactory(root_dir=str(tmp_path)))
    loaded_copy.fit(fitted.traj, n_steps=2, experiment_name="tb", **kw)
    assert any(tmp_path.rglob("events.*"))


def run_cli(*args, timeout=300):
    out = subprocess.run([sys.executable, "-m", "ipd_agent.cli", *args], capture_output=True, text=True,
                         timeout=timeout)
    return out


@pytest.mark.parametrize("cmd", ["fit", "evaluate", "augment", "make-dataset", "bench"])
def test_cli_help_has_an_example(cmd):
    out = run_cli(cmd, "--help")
    assert out.returncode == 0 and "example:" in out.stdout and f"ipd-agent {cmd}" in out.stdout


def test_cli_evaluate_and_augment(fitted, tmp_path, shared_datasets):
    out = run_cli("evaluate", fitted.path, "--env", "Hopper-v5", "--episodes", "1")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout[out.stdout.index("{"):])
    assert np.isfinite(res["return_mean"]) and np.isfinite(res["normalized_score"])
    # augment a real Minari file and write the result as a new Minari dataset plus a PNG report
    import shutil

    root = tmp_path / "mds"
    shutil.copytree(shared_datasets / "d4rlstyle" / "hopper" / "medium-v0", root / "d4rlstyle" / "hopper" / "medium-v0")
    shutil.copy(shared_datasets / "d4rlstyle" / "namespace_metadata.json", root / "d4rlstyle")
    shutil.copy(shared_datasets / "d4rlstyle" / "hopper" / "namespace_metadata.json", root / "d4rlstyle" / "hopper")
    out = run_cli("augment", fitted.path, "d4rlstyle/hopper/medium-v0", "--minari-path", str(root),
                  "--out-id", "test/hopper/aug-v0", "--n-branches", "16", "--report", str(tmp_path / "r.png"))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert (tmp_path / "r.png").stat().st_size > 10_000
    import minari

    from conftest import minari_root

    with minari_root(root):
        ds = minari.load_dataset("test/hopper/aug-v0")
        n_real_rows = sum(len(ep.rewards) for ep in ds.iterate_episodes() if not np.any(ep.infos["imagined"]))
        assert n_real_rows == 100_000  # the real episodes are all there, unchanged in count
        n_im = sum(int(np.sum(ep.infos["imagined"])) for ep in ds.iterate_episodes())
        assert n_im == summary["imagined_transitions"]


def test_cli_reports_bad_input_clearly(tmp_path):
    bad = tmp_path / "bad.d3"
    bad.write_bytes(b"not a model")
    out = run_cli("evaluate", str(bad), "--env", "Hopper-v5")
    assert out.returncode == 2 and "Could not load an IPD model" in out.stderr
    # fit refuses an output folder that does not exist before loading data or fitting anything
    out = run_cli("fit", "nobody/nothing-v0", "--out", str(tmp_path / "missing" / "m.d3"))
    assert out.returncode == 2 and "does not exist; create it first" in out.stderr
    out = run_cli("fit", "nobody/nothing-v0", "--out", str(tmp_path / "m.d3"), "--config", '{"sead": 1}')
    assert out.returncode == 2 and "unknown IPDConfig field(s) ['sead']" in out.stderr


def test_cli_make_dataset_writes_three_d4rl_style_datasets(tmp_path):
    out = run_cli("make-dataset", "InvertedPendulum-v5", "--steps", "400", "--root", str(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout[out.stdout.index("{"):])
    assert info["medium-replay"]["transitions"] == 266 and info["full-replay"]["transitions"] == 400
    assert info["ref_min_score"] == 0.0 and info["ref_max_score"] == 1000.0
    import minari

    from ipd_agent import load_minari

    from conftest import minari_root

    with minari_root(tmp_path):
        traj, meta = load_minari("ipd/invertedpendulum/full-replay-v0")
        assert traj.n_transitions == 400 and meta["ref_max_score"] == 1000.0
        # actions were rescaled to [-1, 1] and the wrapper is part of the recorded env
        assert np.abs(traj.actions).max() <= 1.0
        env = minari.load_dataset("ipd/invertedpendulum/medium-v0").recover_environment()
        assert np.all(env.action_space.high == 1.0)


def test_cli_fit_then_deploy_loop_example(tmp_path, hopper_episodes):
    """`ipd-agent fit` on a real Minari file, then examples/deploy_loop.py runs the saved model in Gymnasium."""
    import os

    from conftest import write_minari

    write_minari(tmp_path / "mds", "test/hopper/random-v0", "Hopper-v5", hopper_episodes[:40])
    cfg = {"value": {"n_steps": 100, "hidden_units": [32, 32]},
           "world_model": {"max_steps": 100, "eval_every": 50, "hidden_size": 16, "n_layers": 1},
           "planner": {"n_samples": 8, "n_iterations": 1}, "augment": {"n_branches": 8, "segment_length": 4},
           "transformer": {"hidden_size": 16, "n_layers": 1}, "context_size": 4}
    model = str(tmp_path / "m.d3")
    out = run_cli("fit", "test/hopper/random-v0", "--minari-path", str(tmp_path / "mds"), "--config", json.dumps(cfg),
                  "--n-steps", "10", "--out", model, "--logdir", str(tmp_path / "logs"))
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout[out.stdout.rindex("\n{") + 1:])  # the command's JSON is printed last
    assert set(res["stage_times_s"]) == {"value", "world_model", "augment", "transformer"}
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "deploy_loop.py")
    run = subprocess.run([sys.executable, example, model, "--env", "Hopper-v5", "--episodes", "2"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("episode ") == 2 and "mean return" in run.stdout
