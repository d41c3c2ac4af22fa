"""IPD on a CUDA GPU: every stage fits there, and the model predicts, saves, loads, resumes, exports and benchmarks.

Skipped where torch sees no GPU (CI has none); run on a GPU machine with ``pytest tests/test_device.py``. The last test
is the CPU side of the same contract: asking for a GPU on a machine without one is refused with the fix.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from ipd_agent import IPDPolicy, load_ipd
from ipd_agent.bench import evaluate, run_sweep
from ipd_agent.cli import main as cli_main

from conftest import FIT_KW, tiny_config, write_minari
from test_bench import PROFILE

GPU = "cuda:0"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")


def _tensors(algo):
    mods = algo.impl.modules
    for name in ("transformer", "token", "value", "world_model", "stages"):
        module = getattr(mods, name)
        yield from ((f"{name}.{k}", t) for k, t in module.state_dict().items())


@pytest.fixture(scope="module")
def gpu_fit(hopper_traj, tmp_path_factory):
    import d3rlpy

    d3rlpy.seed(0)
    ckpt = tmp_path_factory.mktemp("gpu_ckpt")
    algo = tiny_config().create(device=GPU)
    out = algo.fit(hopper_traj, checkpoint_dir=str(ckpt), checkpoint_every=10, **FIT_KW)
    return algo, out, ckpt


@needs_gpu
def test_every_stage_fits_on_the_gpu_and_stays_there(gpu_fit):
    algo, out, _ = gpu_fit
    off = [k for k, t in _tensors(algo) if t.device.type != "cuda"]
    assert not off, f"tensors left on the CPU: {off[:5]}"
    assert set(out["stage_times"]) >= {"value", "world_model", "augment", "transformer"}
    assert out["augmentation"]["n_branches"] == 32 and np.isfinite(out["last"]["loss"])


@needs_gpu
def test_gpu_model_predicts_and_loads_on_the_cpu_with_the_same_actions(gpu_fit, hopper_traj, tmp_path):
    algo, _, _ = gpu_fit
    obs = hopper_traj.observations[:16]
    act = algo.predict(obs)
    assert isinstance(act, np.ndarray) and act.shape == (16, hopper_traj.action_dim)
    assert np.all(np.isfinite(act)) and np.all(np.abs(act) <= 1.0)
    algo.save(str(tmp_path / "m.d3"))
    back = load_ipd(str(tmp_path / "m.d3"), GPU)
    np.testing.assert_allclose(back.predict(obs), act, atol=1e-6)  # the same weights on the same device
    cpu = load_ipd(str(tmp_path / "m.d3"), "cpu:0")
    assert next(cpu.impl.transformer.parameters()).device.type == "cpu"
    # the same weights on the CPU: cuBLAS and the CPU kernels sum in other orders (no TF32: torch's default is off);
    # on the H200 the actions differed by up to 4e-4
    np.testing.assert_allclose(cpu.predict(obs), act, atol=2e-3)


@needs_gpu
def test_gpu_policy_runs_a_gymnasium_episode_and_the_harness_evaluates_it(gpu_fit):
    algo, _, _ = gpu_fit
    policy = IPDPolicy(algo, gym.make("Hopper-v5").action_space)
    env = gym.make("Hopper-v5", max_episode_steps=50)
    o, _ = env.reset(seed=0)
    for _ in range(50):
        a, _ = policy.predict(o)
        assert a.shape == (3,) and a.dtype == np.float32
        o, _, te, tr, _ = env.step(a)
        if te or tr:
            break
    batch, _ = policy.predict(np.stack([o, o]))  # a VecEnv-style batch
    assert batch.shape == (2, 3)
    rets = evaluate(algo, "Hopper-v5", 1, seed=0)
    assert len(rets) == 1 and np.isfinite(rets[0])


@needs_gpu
def test_gpu_fit_resumes_from_its_checkpoint_onto_the_gpu(gpu_fit, hopper_traj):
    algo, _, ckpt = gpu_fit
    again = tiny_config().create(device=GPU)
    again.fit(hopper_traj, checkpoint_dir=str(ckpt), resume=True, **FIT_KW)  # every stage is done: nothing retrains
    for (k, a), (_, b) in zip(_tensors(algo), _tensors(again)):
        assert b.device.type == "cuda" and torch.equal(a, b), k


@needs_gpu
def test_gpu_model_exports_a_policy_that_runs_on_the_cpu(gpu_fit, hopper_traj, tmp_path):
    algo, _, _ = gpu_fit
    algo.save_policy(str(tmp_path / "policy.pt"))
    exported = torch.jit.load(str(tmp_path / "policy.pt"), map_location="cpu")
    obs = torch.from_numpy(hopper_traj.observations[:1])
    with torch.no_grad():
        a = exported(obs, torch.zeros(1, hopper_traj.action_dim)).numpy()
    np.testing.assert_allclose(a, algo.predict(hopper_traj.observations[:1])[0], atol=2e-3)  # CPU vs GPU kernels
    assert next(algo.impl.transformer.parameters()).device.type == "cuda"  # the model itself stays on the GPU


@needs_gpu
def test_benchmark_sweep_runs_ipd_and_a_baseline_on_the_gpu(hopper_episodes, tmp_path):
    import dataclasses

    root = tmp_path / "datasets"
    write_minari(root, "ipdtest/hopper-random-v0", "Hopper-v5", hopper_episodes[:40])
    jobs = [{"algo": a, "dataset": "ipdtest/hopper-random-v0", "seed": 0} for a in ("ipd", "dt")]
    prof = dataclasses.replace(PROFILE, device=GPU)
    rows = run_sweep(jobs, prof, str(tmp_path / "results"), workers=2, dataset_root=str(root), show_progress=False)
    assert {r["algo"] for r in rows} == {"ipd", "dt"}
    for r in rows:
        assert r["profile"]["device"] == GPU and np.isfinite(r["normalized_score"])
    saved = load_ipd(str(tmp_path / "results" / "models" / "ipdtest__hopper-random-v0" / "ipd_seed0.d3"), GPU)
    assert next(saved.impl.world_model.parameters()).device.type == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_asking_for_a_gpu_without_one_is_refused_before_any_work(tmp_path, capsys):
    code = cli_main(["bench", "--profile", "tiny", "--device", GPU, "--datasets", "ns/none-v0", "--algos", "ipd",
                     "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "sees no CUDA GPU" in err and "--device cpu:0" in err
    assert not (tmp_path / "r").exists()  # refused before the sweep started
    code = cli_main(["fit", "ns/none-v0", "--device", GPU, "--out", str(tmp_path / "m.d3")])
    assert code == 2 and "sees no CUDA GPU" in capsys.readouterr().err
