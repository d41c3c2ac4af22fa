"""Bad input fails fast, before any training, with a message that says what is wrong and where."""
from __future__ import annotations

import dataclasses
import time

import d3rlpy
import gymnasium as gym
import numpy as np
import pytest

from ipd_agent import DatasetError, IPDConfig, IPDPolicy, Trajectories, load_ipd, to_trajectories

from conftest import FIT_KW, collect_episodes, tiny_config, write_minari

FAST = 5.0  # seconds: every check here must trip before a single gradient step


def fails_fast(exc, match, fn, *args, **kwargs):
    t0 = time.perf_counter()
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kwargs)
    assert time.perf_counter() - t0 < FAST
    return info


def fresh_fit(dataset, **kw):
    """Fits a new tiny IPD; asserts nothing was built when it fails."""
    algo = tiny_config().create(device="cpu:0")
    try:
        algo.fit(dataset, **FIT_KW, **kw)
    finally:
        fresh_fit.last = algo


def assert_untrained():
    assert fresh_fit.last.impl is None, "the model was built before the input was checked"


def _copy(traj: Trajectories, **changes) -> Trajectories:
    fields = {f.name: getattr(traj, f.name).copy() for f in dataclasses.fields(traj)}
    fields.update(changes)
    return Trajectories(**fields)


# ----- action spaces -----------------------------------------------------------------------------
def test_discrete_d3rlpy_dataset_is_rejected():
    rng = np.random.default_rng(0)
    ds = d3rlpy.dataset.MDPDataset(
        observations=rng.normal(size=(40, 4)).astype(np.float32), actions=rng.integers(0, 2, (40, 1)),
        rewards=rng.normal(size=(40, 1)).astype(np.float32), terminals=(np.arange(40) % 10 == 9).astype(np.float32),
        action_space=d3rlpy.ActionSpace.DISCRETE, action_size=2)
    fails_fast(DatasetError, r"continuous action space.*discrete", fresh_fit, ds)
    assert_untrained()


def test_discrete_minari_dataset_is_rejected(tmp_path):
    eps = collect_episodes("CartPole-v1", 3, seed=0)
    ds = write_minari(tmp_path, "ipdtest/cartpole-v0", "CartPole-v1", eps)
    fails_fast(DatasetError, r"continuous \(Box\) action space.*Discrete\(2\)", fresh_fit, ds)
    assert_untrained()
    # the same through its local path
    fails_fast(DatasetError, r"Discrete\(2\)", to_trajectories, str(tmp_path / "ipdtest" / "cartpole-v0"))


def test_actions_outside_the_unit_box_are_rejected(hopper_traj):
    bad = _copy(hopper_traj)
    bad.actions[17, 1] = 1.5
    fails_fast(DatasetError, r"Actions reach \|a\| = 1\.5.*RescaleAction", fresh_fit, bad)
    assert_untrained()


# ----- non-finite values -------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["observations", "actions", "rewards", "next_observations"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_reported_with_their_location(hopper_traj, field, value):
    bad = _copy(hopper_traj)
    row = int(bad.episode_starts[4]) + 2  # episode 4, step 2
    arr = getattr(bad, field)
    if arr.ndim == 1:
        arr[row] = value
    else:
        arr[row, 0] = value
    fails_fast(DatasetError, rf"^{field} contains 1 NaN/inf values \(first at transition {row}, episode 4, step 2\)",
               fresh_fit, bad)
    assert_untrained()


def test_nan_in_a_d3rlpy_dataset_is_reported(hopper_traj):
    obs = hopper_traj.observations.copy()
    obs[30, 3] = np.nan
    ends = hopper_traj.episode_ends
    ds = d3rlpy.dataset.MDPDataset(observations=obs, actions=hopper_traj.actions, rewards=hopper_traj.rewards[:, None],
                                   terminals=(ends & hopper_traj.terminals).astype(np.float32),
                                   timeouts=(ends & ~hopper_traj.terminals).astype(np.float32))
    fails_fast(DatasetError, r"^observations contains 1 NaN/inf values \(first at transition 30", fresh_fit, ds)
    assert_untrained()


def test_float64_trajectories_are_stored_as_float32_and_train(hopper_traj):
    fields = {f.name: getattr(hopper_traj, f.name).copy() for f in dataclasses.fields(hopper_traj)}
    for name in ("observations", "actions", "rewards", "next_observations"):
        fields[name] = fields[name].astype(np.float64)
    t64 = Trajectories(**fields)
    assert all(getattr(t64, k).dtype == np.float32 for k in ("observations", "actions", "rewards",
                                                              "next_observations"))
    assert t64.fingerprint() == hopper_traj.fingerprint()  # the same data, so the same cached results
    algo = tiny_config().create(device="cpu:0")
    algo.fit(t64, **FIT_KW)
    assert np.all(np.abs(algo.predict(hopper_traj.observations[:3].astype(np.float64))) <= 1.0)


# ----- empty and too-short data ------------------------------------------------------------------
def test_empty_datasets_are_rejected():
    empty = Trajectories(observations=np.zeros((0, 3), np.float32), actions=np.zeros((0, 1), np.float32),
                         rewards=np.zeros(0, np.float32), next_observations=np.zeros((0, 3), np.float32),
                         terminals=np.zeros(0, bool), episode_starts=np.zeros(1, np.int64))
    fails_fast(DatasetError, r"empty \(0 transitions\)", fresh_fit, empty)
    assert_untrained()
    fails_fast(DatasetError, r"no episodes", Trajectories.from_episodes, [])
    buf = d3rlpy.dataset.create_infinite_replay_buffer(env=gym.make("Hopper-v5"))
    fails_fast(DatasetError, r"empty \(0 episodes\)", fresh_fit, buf)
    assert_untrained()


def test_episodes_shorter_than_two_steps_are_rejected(hopper_traj):
    rng = np.random.default_rng(0)
    eps = [{"observations": rng.normal(size=(n + 1, 3)), "actions": rng.uniform(-1, 1, (n, 1)),
            "rewards": rng.normal(size=n), "terminated": True} for n in (5, 1, 4)]
    fails_fast(DatasetError, r"1 episode\(s\) have fewer than 2 steps \(first: episode 1, length 1\)",
               fresh_fit, Trajectories.from_episodes(eps))
    assert_untrained()
    # the same through d3rlpy: a terminal right after the first step of the second episode
    term = np.zeros(12, np.float32)
    term[[4, 5, 11]] = 1.0
    ds = d3rlpy.dataset.MDPDataset(observations=rng.normal(size=(12, 3)).astype(np.float32),
                                   actions=rng.uniform(-1, 1, (12, 1)).astype(np.float32),
                                   rewards=rng.normal(size=(12, 1)).astype(np.float32), terminals=term)
    fails_fast(DatasetError, r"fewer than 2 steps \(first: episode 1, length 1\)", fresh_fit, ds)
    assert_untrained()


def test_mismatched_observation_counts_are_rejected():
    rng = np.random.default_rng(0)
    ep = {"observations": rng.normal(size=(7, 3)), "actions": rng.uniform(-1, 1, (4, 1)), "rewards": np.zeros(4),
          "terminated": False}
    fails_fast(DatasetError, r"7 observations for 4 actions; expected 4 or 5", Trajectories.from_episodes, [ep])


def test_inconsistent_trajectory_arrays_are_rejected(hopper_traj):
    t, n = hopper_traj, hopper_traj.n_transitions
    fails_fast(DatasetError, rf"rewards has {n - 1} rows but observations has {n}", fresh_fit,
               _copy(t, rewards=t.rewards[:-1]))
    assert_untrained()
    fails_fast(DatasetError, r"next_observations are shaped \(10,\) per row but observations \(11,\)", fresh_fit,
               _copy(t, next_observations=t.next_observations[:, :10]))
    starts = t.episode_starts.copy()
    starts[-1] -= 3  # the last episode claims fewer rows than there are
    fails_fast(DatasetError, r"episode_starts must rise strictly from 0", fresh_fit, _copy(t, episode_starts=starts))
    starts = t.episode_starts.copy()
    starts[[1, 2]] = starts[[2, 1]]  # out of order
    fails_fast(DatasetError, r"episode_starts must rise strictly from 0", fresh_fit, _copy(t, episode_starts=starts))
    term = t.terminals.copy()
    term[t.episode_starts[1] + 3] = True  # a terminal in the middle of episode 1
    fails_fast(DatasetError, rf"1 terminal flag\(s\) fall inside episodes \(first: transition "
                             rf"{t.episode_starts[1] + 3}, episode 1\)", fresh_fit, _copy(t, terminals=term))
    assert_untrained()
    rng = np.random.default_rng(0)
    ep = {"observations": rng.normal(size=(6, 3)), "actions": rng.uniform(-1, 1, (5, 1)), "rewards": np.zeros(7),
          "terminated": False}
    fails_fast(DatasetError, r"Episode 0 has 7 rewards for 5 actions", Trajectories.from_episodes, [ep])
    empty = {"observations": np.zeros((1, 3)), "actions": np.zeros((0, 1)), "rewards": np.zeros(0),
             "terminated": False}
    fails_fast(DatasetError, r"Episode 1 has no steps", Trajectories.from_episodes, [ep | {"rewards": np.zeros(5)},
                                                                                      empty])


def test_unsupported_dataset_types_are_rejected():
    fails_fast(DatasetError, r"offline dataset, not an environment", fresh_fit, gym.make("Hopper-v5"))
    fails_fast(DatasetError, r"Unsupported dataset type dict", fresh_fit, {"observations": np.zeros((3, 2))})
    fails_fast(DatasetError, r"Could not load Minari dataset 'nobody/nothing-v0'.*MINARI_DATASETS_PATH",
               fresh_fit, "nobody/nothing-v0")


# ----- shapes at inference -----------------------------------------------------------------------
def test_predict_rejects_wrong_observation_shapes(fitted):
    algo = fitted.algo
    fails_fast(ValueError, r"predict expects observations shaped \(batch, 11\); got \(2, 12\)",
               algo.predict, np.zeros((2, 12), np.float32))
    fails_fast(ValueError, r"got \(11,\).*obs\[None\]", algo.predict, np.zeros(11, np.float32))
    obs = fitted.traj.observations[:2].copy()
    obs[1, 0] = np.nan
    fails_fast(ValueError, r"NaN/inf", algo.predict, obs)


def test_deployment_policies_reject_wrong_observation_shapes(fitted):
    policy = IPDPolicy(fitted.algo)
    fails_fast(ValueError, r"observation shape \(12,\) does not match the model: expected \(11,\)",
               policy.predict, np.zeros(12, np.float32))
    fails_fast(ValueError, r"observation shape \(2, 3, 11\) does not match", policy.predict,
               np.zeros((2, 3, 11), np.float32))
    wrapper = fitted.algo.as_stateful_wrapper()
    fails_fast(ValueError, r"observation shape \(4,\) does not match the model's \(11,\)", wrapper.predict,
               np.zeros(4, np.float32), 0.0)
    bad = np.zeros(11, np.float32)
    bad[3] = np.nan
    fails_fast(ValueError, r"NaN/inf observations", policy.predict, bad)
    fails_fast(ValueError, r"NaN/inf observations", wrapper.predict, bad, 0.0)


def test_action_spaces_other_than_the_unit_box_are_rejected(fitted, hopper_traj):
    """The policy acts on the data's [-1, 1] scale: a [-3, 3] env would get wrongly scaled actions, silently."""
    env = gym.make("InvertedPendulum-v5")  # Box(-3, 3, (1,))
    fails_fast(DatasetError, r"action_space has action bounds \[-3, 3\].*RescaleAction", IPDPolicy, fitted.algo,
               env.action_space)
    from ipd_agent.bench import evaluate

    fails_fast(DatasetError, r"evaluation env 'InvertedPendulum-v5' has action bounds \[-3, 3\]", evaluate,
               fitted.algo, "InvertedPendulum-v5", 1, 0)
    wrapped = gym.wrappers.RescaleAction(env, -1.0, 1.0)
    IPDPolicy(fitted.algo, wrapped.action_space)  # accepted once rescaled


def test_unfitted_model_refuses_to_predict_or_augment(hopper_traj):
    algo = tiny_config().create(device="cpu:0")
    fails_fast(RuntimeError, r"not built", algo.predict, hopper_traj.observations[:2])
    fails_fast(RuntimeError, r"call fit\(\) first", algo.augment, hopper_traj)


# ----- environments and models that do not match the data -----------------------------------------
def test_eval_env_with_other_spaces_is_rejected(hopper_traj):
    fails_fast(DatasetError, r"eval_env spaces \(obs \(4,\), act \(1,\)\) do not match the dataset \(obs \(11,\), act "
                             r"\(3,\)\)", fresh_fit, hopper_traj, eval_env=gym.make("InvertedPendulum-v5"))
    assert_untrained()
    fails_fast(DatasetError, r"eval_env has action space Discrete\(2\)", fresh_fit, hopper_traj,
               eval_env=gym.make("CartPole-v1"))
    assert_untrained()


def test_refitting_a_model_on_data_of_another_shape_is_rejected(loaded_copy):
    rng = np.random.default_rng(0)
    eps = [{"observations": rng.normal(size=(9, 4)), "actions": rng.uniform(-1, 1, (8, 1)), "rewards": np.zeros(8),
            "terminated": False}]
    fails_fast(DatasetError, r"built for observations \(11,\) and 3 actions; the dataset has \(4,\) and 1",
               loaded_copy.fit, Trajectories.from_episodes(eps), **FIT_KW)


# ----- configuration -----------------------------------------------------------------------------
def test_unknown_config_fields_are_rejected():
    fails_fast(ValueError, r"unknown world_model config field\(s\) \['bogus'\]", IPDConfig, world_model={"bogus": 1})
    fails_fast(ValueError, r"unknown planner config field\(s\) \['n_sample'\]", IPDConfig, planner={"n_sample": 8})
    fails_fast(ValueError, r"planner.execute must be one of \('best', 'mean'\), got 'median'", IPDConfig,
               planner={"execute": "median"})
    for beta in (-1.0, float("nan"), float("inf")):
        fails_fast(ValueError, r"transformer.advantage_weight must be a finite number >= 0", IPDConfig,
                   transformer={"advantage_weight": beta})
    # top-level keys from a JSON file or a profile get the same named error, not a bare TypeError
    fails_fast(ValueError, r"unknown IPDConfig field\(s\) \['sead'\]", IPDConfig.from_settings, {"sead": 1})
    from ipd_agent.bench import load_profile, make_ipd_config
    fails_fast(ValueError, r"unknown IPDConfig field\(s\) \['gama'\]", make_ipd_config, load_profile("tiny"), 0,
               {"gama": 0.9})
    fails_fast(TypeError, r"bogus", IPDConfig, bogus=1)


@pytest.mark.parametrize("text, match", [
    ('{"name": "x", "q_step": 10}', r"unknown field\(s\) \['q_step'\]; valid: \['name', 'q_steps'"),
    ('{"q_steps": "ten"}', r"profile field 'q_steps' must be int, got 'ten'"),
    ('{"eval_episodes": true}', r"profile field 'eval_episodes' must be int, got True"),
    ('{"transformer_steps": 0}', r"'transformer_steps' must be at least 1, got 0"),
    ('{"ipd": []}', r"profile field 'ipd' must be dict"),
    ('[1, 2]', r"must hold a JSON object"),
    ('{"q_steps": 10,}', r"is not valid JSON"),
])
def test_a_bad_benchmark_profile_is_refused_with_the_field_named(tmp_path, text, match):
    from ipd_agent.bench import load_profile

    (tmp_path / "p.json").write_text(text)
    fails_fast(ValueError, match, load_profile, str(tmp_path / "p.json"))


def test_inconsistent_transformer_width_is_rejected_before_training(hopper_traj):
    algo = tiny_config(transformer={"hidden_size": 30, "n_heads": 4}).create(device="cpu:0")
    fails_fast(ValueError, r"hidden_size \(30\) must be divisible by n_heads \(4\)", algo.fit, hopper_traj, **FIT_KW)
    assert "value" not in algo.stage_times


# ----- checkpoints -------------------------------------------------------------------------------
def test_truncated_or_corrupt_checkpoints_give_value_error(fitted, tmp_path):
    data = open(fitted.path, "rb").read()
    truncated = tmp_path / "truncated.d3"
    truncated.write_bytes(data[: len(data) // 2])
    fails_fast(ValueError, r"Could not load an IPD model from .*truncated\.d3.*truncated, corrupt", load_ipd,
               str(truncated))
    garbage = tmp_path / "garbage.d3"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    fails_fast(ValueError, r"Could not load an IPD model", load_ipd, str(garbage))
    empty = tmp_path / "empty.d3"
    empty.write_bytes(b"")
    fails_fast(ValueError, r"Could not load an IPD model", load_ipd, str(empty))
    fails_fast(ValueError, r"Could not load an IPD model", load_ipd, str(tmp_path / "missing.d3"))
    fails_fast(ValueError, r"Could not load an IPD model", IPDPolicy.load, str(truncated))


def test_a_checkpoint_of_another_algorithm_is_rejected(hopper_traj, tmp_path):
    bc = d3rlpy.algos.BCConfig(batch_size=16).create(device="cpu:0")
    bc.create_impl((hopper_traj.observation_dim,), hopper_traj.action_dim)
    path = tmp_path / "bc.d3"
    bc.save(str(path))
    fails_fast(ValueError, r"holds a BC, not an IPD model", load_ipd, str(path))


def test_image_observations_are_rejected_with_a_clear_message():
    rng = np.random.default_rng(0)
    ds = d3rlpy.dataset.MDPDataset(
        observations=rng.integers(0, 255, size=(40, 3, 8, 8), dtype=np.uint8),
        actions=rng.uniform(-1, 1, (40, 2)).astype(np.float32), rewards=np.ones((40, 1), np.float32),
        terminals=np.eye(1, 40, 39).ravel().astype(np.float32))
    algo = tiny_config().create(device="cpu:0")
    with pytest.raises(DatasetError, match="flat vector observations.*not supported"):
        algo.fit(ds, **FIT_KW)
    assert algo.impl is None


def test_dict_action_space_env_is_rejected(hopper_traj):
    class DictActions(gym.Wrapper):
        def __init__(self, env):
            super().__init__(env)
            self.action_space = gym.spaces.Dict({"a": env.action_space})

    algo = tiny_config().create(device="cpu:0")
    with pytest.raises(DatasetError, match="Box action space"):
        algo.fit(hopper_traj, eval_env=DictActions(gym.make("Hopper-v5")), **FIT_KW)
    assert algo.impl is None


def test_checkpoint_from_an_incompatible_version_is_rejected(fitted, tmp_path):
    """A file whose saved shapes no longer match the networks (as after an incompatible upgrade)."""
    import json
    import pickle

    from ipd_agent import load_ipd

    with open(fitted.path, "rb") as f:
        obj = pickle.load(f)
    cfg = json.loads(obj["config"])
    cfg["config"]["params"]["transformer"]["hidden_size"] *= 2  # same file, other architecture
    obj["config"], obj["version"] = json.dumps(cfg), "0.0.1"
    bad = tmp_path / "old.d3"
    with open(bad, "wb") as f:
        pickle.dump(obj, f)
    with pytest.raises(ValueError, match="incompatible version"):
        load_ipd(str(bad))


def test_nan_transformer_loss_names_stage_and_step_and_keeps_last_good_weights(loaded_copy, fitted):
    import torch

    loaded_copy.config.transformer.learning_rate = 1e30
    with pytest.raises(FloatingPointError, match=r"transformer stage: loss became .* at step \d+"):
        loaded_copy.fit(fitted.traj, n_steps=200, **FIT_KW)
    assert all(torch.isfinite(p).all() for p in loaded_copy.impl.transformer.parameters())


def test_dict_observation_minari_dataset_is_rejected(tmp_path):
    """A real Minari file whose observations are a Dict space (as goal-conditioned tasks write them)."""
    import warnings

    import minari
    from minari.data_collector import EpisodeBuffer

    from conftest import minari_root

    eps = collect_episodes("Pendulum-v1", 2, seed=0, max_steps=20)
    obs_space = gym.spaces.Dict({"state": gym.make("Pendulum-v1").observation_space})
    buf = [EpisodeBuffer(id=i, seed=e["seed"], observations={"state": e["observations"]}, actions=e["actions"],
                         rewards=e["rewards"], terminations=e["terminations"], truncations=e["truncations"], infos={})
           for i, e in enumerate(eps)]
    with minari_root(tmp_path), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = minari.create_dataset_from_buffers(dataset_id="ipdtest/dictobs-v0", buffer=buf, env="Pendulum-v1",
                                                observation_space=obs_space, author="ipd-agent tests",
                                                algorithm_name="random")
    assert isinstance(ds.observation_space, gym.spaces.Dict)  # the file really holds dict observations
    fails_fast(DatasetError, r"flat Box observations.*Dict.*flatten", fresh_fit, ds)
    assert_untrained()
    fails_fast(DatasetError, r"Dict and image observations are not supported",
               to_trajectories, str(tmp_path / "ipdtest" / "dictobs-v0"))


# ----- benchmark sweeps ----------------------------------------------------------------------------
def test_a_sweep_with_a_bad_entry_is_refused_before_any_worker_starts(hopper_episodes, tmp_path):
    """An unknown algorithm, a dataset that is not there or a discrete-action dataset anywhere in the job list stops
    the sweep at once, not when that entry's turn comes; nothing is written."""
    from ipd_agent.bench import Profile, run_sweep

    root = tmp_path / "datasets"
    write_minari(root, "ipdtest/hopper-random-v0", "Hopper-v5", hopper_episodes[:5])
    write_minari(root, "ipdtest/cartpole-v0", "CartPole-v1", collect_episodes("CartPole-v1", 3, seed=0))
    good = {"algo": "bc", "dataset": "ipdtest/hopper-random-v0", "seed": 0}
    out = tmp_path / "results"
    for bad, match in [({"algo": "sac"}, r"unknown algorithm\(s\) \['sac'\]"),
                       ({"dataset": "ipdtest/missing-v0"}, r"ipdtest/missing-v0.*MINARI_DATASETS_PATH"),
                       ({"dataset": "ipdtest/cartpole-v0"}, r"continuous \(Box\) action space.*Discrete\(2\)")]:
        exc = ValueError if "algo" in bad else DatasetError
        fails_fast(exc, match, run_sweep, [good, {**good, **bad}], Profile(q_steps=10**7), str(out),
                   dataset_root=str(root), show_progress=False)
    assert not out.exists()
