"""An interrupted fit (a real SIGKILL) resumes from its checkpoint and ends where an uninterrupted fit ends."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import FIT_KW, tiny_config

CONFIG = dict(world_model={"max_steps": 4000, "eval_every": 100, "patience": 10_000, "hidden_size": 32,
                           "n_layers": 2},
              transformer={"n_steps": 300, "hidden_size": 32, "n_layers": 1})
CHILD = """
import sys, numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from conftest import tiny_config, FIT_KW
from ipd_agent import Trajectories
z = np.load({data!r})
traj = Trajectories(**{{k: z[k] for k in z.files}})
algo = tiny_config(**{config!r}).create(device="cpu:0")
algo.fit(traj, checkpoint_dir={ckpt!r}, checkpoint_every=25, **FIT_KW)
"""


def _save_traj(traj, path):
    np.savez(path, observations=traj.observations, actions=traj.actions, rewards=traj.rewards,
             next_observations=traj.next_observations, terminals=traj.terminals, episode_starts=traj.episode_starts)


def _kill_when(tmp_path, traj, ready, what, config=CONFIG):
    data, ckpt = str(tmp_path / "data.npz"), str(tmp_path / "ckpt")
    _save_traj(traj, data)
    code = CHILD.format(tests=os.path.dirname(__file__), data=data, config=config, ckpt=ckpt)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while not ready(ckpt):
        assert proc.poll() is None, f"child ended before the {what} stage: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() - t0 < 240, f"timed out waiting for the {what} stage"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return ckpt


@pytest.fixture(scope="module")
def uninterrupted(hopper_traj):
    algo = tiny_config(**CONFIG).create(device="cpu:0")
    algo.fit(hopper_traj, **FIT_KW)
    return algo


def _resume_and_compare(ckpt, traj, reference, config=CONFIG):
    from ipd_agent import load_ipd

    algo = tiny_config(**config).create(device="cpu:0")
    algo.fit(traj, checkpoint_dir=ckpt, resume=True, **FIT_KW)
    obs = traj.observations[::20]
    np.testing.assert_array_equal(algo.predict(obs), reference.predict(obs))
    a, b = algo.augmentation.trajectories, reference.augmentation.trajectories
    assert a.observations.tobytes() == b.observations.tobytes()
    # and the final checkpoint on disk is complete and equal too
    np.testing.assert_array_equal(load_ipd(os.path.join(ckpt, "ipd.d3")).predict(obs), reference.predict(obs))


def test_kill_during_world_model_stage_then_resume(tmp_path, hopper_traj, uninterrupted):
    from ipd_agent import load_ipd

    def value_done(ckpt):  # the checkpoint written right after the value stage: the world model is training
        return os.path.exists(os.path.join(ckpt, "ipd.d3"))

    ckpt = _kill_when(tmp_path, hopper_traj, value_done, "world-model")
    saved = load_ipd(os.path.join(ckpt, "ipd.d3"))
    assert saved.impl.stages.is_done("value") and not saved.impl.stages.is_done("world_model")
    _resume_and_compare(ckpt, hopper_traj, uninterrupted)


def _transformer_started(ckpt):
    return os.path.exists(os.path.join(ckpt, "train_state.pt"))


def test_kill_during_transformer_stage_then_resume(tmp_path, hopper_traj, uninterrupted):
    import torch

    ckpt = _kill_when(tmp_path, hopper_traj, _transformer_started, "transformer")
    st = torch.load(os.path.join(ckpt, "train_state.pt"), weights_only=False)
    assert 0 < st["step"] < CONFIG["transformer"]["n_steps"]
    _resume_and_compare(ckpt, hopper_traj, uninterrupted)


def test_resume_with_a_weight_average_ends_where_an_uninterrupted_fit_ends(tmp_path, hopper_traj):
    """The checkpoint holds the averaged weights (deployable); the raw ones travel in train_state.pt."""
    import torch

    config = {**CONFIG, "transformer": {**CONFIG["transformer"], "ema_decay": 0.95}}
    reference = tiny_config(**config).create(device="cpu:0")
    reference.fit(hopper_traj, **FIT_KW)
    ckpt = _kill_when(tmp_path, hopper_traj, _transformer_started, "transformer", config)
    st = torch.load(os.path.join(ckpt, "train_state.pt"), weights_only=False)
    assert 0 < st["step"] < CONFIG["transformer"]["n_steps"] and st["ema_updates"] == st["step"]
    _resume_and_compare(ckpt, hopper_traj, reference, config)


def test_kill_during_a_later_members_training_then_resume(tmp_path, hopper_traj):
    """With transformer.n_members=2 a kill while member 1 trains resumes member 1 from its own train state (member 0
    done, not retrained) and ends where an uninterrupted fit ends, weight averages included."""
    import torch

    config = {**CONFIG, "transformer": {**CONFIG["transformer"], "ema_decay": 0.95, "n_members": 2}}
    reference = tiny_config(**config).create(device="cpu:0")
    reference.fit(hopper_traj, **FIT_KW)
    ckpt = _kill_when(tmp_path, hopper_traj, lambda c: os.path.exists(os.path.join(c, "train_state_member1.pt")),
                      "member 1", config)
    st = torch.load(os.path.join(ckpt, "train_state_member1.pt"), weights_only=False)
    assert 0 < st["step"] < CONFIG["transformer"]["n_steps"]
    member0 = torch.load(os.path.join(ckpt, "train_state.pt"), weights_only=False)
    assert member0["step"] == CONFIG["transformer"]["n_steps"]  # member 0 finished before member 1 started
    _resume_and_compare(ckpt, hopper_traj, reference, config)


def test_resume_needs_a_checkpoint_dir(hopper_traj):
    with pytest.raises(ValueError, match="checkpoint_dir"):
        tiny_config().create(device="cpu:0").fit(hopper_traj, resume=True, **FIT_KW)


def test_a_kill_between_the_state_and_the_model_write_still_resumes_exactly(tmp_path, hopper_traj, uninterrupted):
    """The transformer checkpoint is two files; a kill after the new train state but before the new model must
    resume from the previous, matching state (kept as train_state.pt.prev), not from a state ahead of the model."""
    import shutil

    ckpt = str(tmp_path / "ckpt")
    model_at_25 = str(tmp_path / "model_at_25.d3")

    class Stop(Exception):
        pass

    def on_step(model, epoch, step):
        if step == 26:  # the checkpoint of step 25 is on disk
            shutil.copy(os.path.join(ckpt, "ipd.d3"), model_at_25)
        if step == 60:  # after the checkpoint of step 50
            raise Stop

    algo = tiny_config(**CONFIG).create(device="cpu:0")
    with pytest.raises(Stop):
        algo.fit(hopper_traj, checkpoint_dir=ckpt, checkpoint_every=25, callback=on_step, **FIT_KW)
    shutil.copy(model_at_25, os.path.join(ckpt, "ipd.d3"))  # as if killed before the step-50 model was written
    _resume_and_compare(ckpt, hopper_traj, uninterrupted)
