"""Speed of every IPD stage against its peer, measured side by side in one run (one torch thread).

    python benchmarks/speed.py                      # ~3 minutes on an idle 2-core CPU
    python benchmarks/speed.py --out benchmarks/results/speed.json

1. transformer training steps/s: ours (fp32 and bf16 autocast) vs d3rlpy DecisionTransformer, same width,
   depth, context, batch and thread count;
2. world-model ensemble: training samples/s and one-step prediction throughput;
3. MPC: imagined transitions/s and planner calls/s, batched vs a naive per-branch-state loop of the same planner;
4. inference latency per step (batch 1): our stateful policy vs d3rlpy's StatefulTransformerWrapper, and the
   exported TorchScript policy;
5. bf16 accuracy: held-out action error after the same training in fp32 and in bf16 autocast (real data);
   ``--profile`` prints torch.profiler's top ops of our training step.
Whole-fit wall time per stage comes from the benchmark runs (stage_times_s in each result row).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch


def timeit(fn, n: int, warmup: int = 2) -> float:
    """Seconds per call (median of ``n`` after ``warmup``)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def train_step(net, opt, o, a, g, m, bf16: bool) -> None:
    """One behaviour-cloning step of our transformer (fp32 or bf16 autocast), shared by every timing below."""
    from ipd_agent.transformer import value_guided_loss

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        p = net(o, a, g)
    loss, _ = value_guided_loss(p.float(), a, o, m, None, 0.0)
    opt.zero_grad()
    loss.backward()
    opt.step()


def transformer_training(obs_dim: int, act_dim: int, hidden: int, layers: int, k: int, batch: int, n: int) -> dict:
    import d3rlpy
    from d3rlpy.dataset import MDPDataset

    from ipd_agent.config import TransformerNetConfig
    from ipd_agent.data import Trajectories
    from ipd_agent.transformer import CausalTransformer, WindowSampler

    rng = np.random.default_rng(0)
    n_ep, t_ep = 50, 200
    obs = rng.normal(size=(n_ep * t_ep, obs_dim)).astype(np.float32)
    act = np.tanh(rng.normal(size=(n_ep * t_ep, act_dim))).astype(np.float32)
    rew = rng.normal(size=n_ep * t_ep).astype(np.float32)
    starts = np.arange(0, n_ep * t_ep + 1, t_ep)
    traj = Trajectories(obs, act, rew, obs, np.zeros(len(obs), bool), starts)
    out = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        cfg = TransformerNetConfig(hidden_size=hidden, n_layers=layers, n_heads=1)
        net = CausalTransformer(obs_dim, act_dim, k, cfg)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        sampler = WindowSampler(traj, rew, k, 0.0)

        def step():
            train_step(net, opt, *sampler.sample(batch), bf16)

        out["ours_bf16" if bf16 else "ours_fp32"] = 1.0 / timeit(step, n)
    ds = MDPDataset(obs, act, rew.reshape(-1, 1), np.zeros(len(obs)), timeouts=np.isin(np.arange(len(obs)), starts[1:] - 1))
    dt = d3rlpy.algos.DecisionTransformerConfig(
        batch_size=batch, context_size=k, num_heads=1, num_layers=layers,
        encoder_factory=d3rlpy.models.VectorEncoderFactory([hidden], exclude_last_activation=True),
    ).create(device="cpu:0")
    dt.build_with_dataset(ds)

    def dt_step():
        dt.update(ds.sample_trajectory_batch(batch, length=k))

    out["d3rlpy_dt"] = 1.0 / timeit(dt_step, n)
    out["speedup_fp32"] = out["ours_fp32"] / out["d3rlpy_dt"]
    out["speedup_bf16"] = out["ours_bf16"] / out["d3rlpy_dt"]
    return out, dt


def bf16_accuracy(minari_path: str, dataset_id: str, hidden: int, layers: int, k: int, batch: int, n: int) -> dict:
    """Same seed, same batches, fp32 vs bf16 autocast training on real data: held-out action MSE of each.

    Return tokens are plain discounted returns-to-go (no value function needed); 10% of episodes are held out.
    """
    import os

    from ipd_agent.config import TransformerNetConfig
    from ipd_agent.data import Trajectories, load_minari
    from ipd_agent.transformer import CausalTransformer, WindowSampler, value_returns_to_go

    os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(minari_path)
    traj, _ = load_minari(dataset_id)
    rtg = value_returns_to_go(traj, np.zeros(traj.n_transitions, np.float32), 0.99)
    n_val = max(1, traj.n_episodes // 10)
    cut = int(traj.episode_starts[traj.n_episodes - n_val])
    train = Trajectories(traj.observations[:cut], traj.actions[:cut], traj.rewards[:cut],
                         traj.next_observations[:cut], traj.terminals[:cut],
                         traj.episode_starts[:traj.n_episodes - n_val + 1])
    val = Trajectories(traj.observations[cut:], traj.actions[cut:], traj.rewards[cut:],
                       traj.next_observations[cut:], traj.terminals[cut:],
                       traj.episode_starts[traj.n_episodes - n_val:] - cut)
    vo, va, vg, vm = WindowSampler(val, rtg[cut:], k, 0.0, seed=123).sample(2048)
    out = {"dataset": dataset_id, "steps": n, "hidden": hidden, "layers": layers}
    for bf16 in (False, True):
        torch.manual_seed(0)
        net = CausalTransformer(traj.observation_dim, traj.action_dim, k,
                                TransformerNetConfig(hidden_size=hidden, n_layers=layers))
        net.obs_mean.copy_(torch.from_numpy(train.observations.mean(0)))
        net.obs_std.copy_(torch.from_numpy(train.observations.std(0) + 1e-6))
        net.rtg_scale.fill_(float(np.abs(rtg[:cut]).mean()))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
        sampler = WindowSampler(train, rtg[:cut], k, 0.0, seed=0)
        t0 = time.perf_counter()
        for _ in range(n):
            train_step(net, opt, *sampler.sample(batch), bf16)
        dt = time.perf_counter() - t0
        net.eval()
        with torch.no_grad():
            mse = float(((((net(vo, va, vg) - va) ** 2).sum(-1)) * vm).sum() / vm.sum())
        key = "bf16" if bf16 else "fp32"
        out[f"{key}_heldout_action_mse"], out[f"{key}_train_s"] = mse, dt
    return out


def profile_transformer(obs_dim: int, act_dim: int, hidden: int, layers: int, k: int, batch: int, bf16: bool) -> str:
    """torch.profiler table (top 10 ops by self CPU time) of 10 training steps of our transformer."""
    from torch.profiler import ProfilerActivity, profile

    from ipd_agent.config import TransformerNetConfig
    from ipd_agent.transformer import CausalTransformer

    net = CausalTransformer(obs_dim, act_dim, k, TransformerNetConfig(hidden_size=hidden, n_layers=layers))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    o, a, g = torch.randn(batch, k, obs_dim), torch.rand(batch, k, act_dim) * 2 - 1, torch.randn(batch, k)
    m = torch.ones(batch, k, dtype=torch.bool)

    def step():
        train_step(net, opt, o, a, g, m, bf16)

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)


def profile_planner(obs_dim: int, act_dim: int, n_branches: int, bf16: bool) -> str:
    """torch.profiler table (top 10 ops by self CPU time) of one batched planner call (default PlannerConfig)."""
    from torch.profiler import ProfilerActivity, profile

    from ipd_agent.config import PlannerConfig, ValueConfig, WorldModelConfig
    from ipd_agent.planner import MPCPlanner
    from ipd_agent.value import ValueFunctions, make_iql
    from ipd_agent.world_model import WorldModel

    wm = WorldModel(obs_dim, act_dim, WorldModelConfig()).eval()
    wm.threshold.fill_(float("inf"))
    iql = make_iql(ValueConfig(), "cpu:0")
    iql.create_impl((obs_dim,), act_dim)
    value = ValueFunctions(iql)
    value.freeze()
    planner = MPCPlanner(wm, value, PlannerConfig(bf16=bf16))
    states = torch.randn(n_branches, obs_dim)
    planner.plan(states, generator=torch.Generator().manual_seed(0))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        planner.plan(states, generator=torch.Generator().manual_seed(0))
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)


def world_model_and_planner(obs_dim: int, act_dim: int, n_branches: int) -> dict:
    import d3rlpy

    from ipd_agent.config import PlannerConfig, ValueConfig, WorldModelConfig
    from ipd_agent.planner import MPCPlanner
    from ipd_agent.value import ValueFunctions, make_iql
    from ipd_agent.world_model import WorldModel

    cfg = WorldModelConfig()
    wm = WorldModel(obs_dim, act_dim, cfg).eval()
    wm.threshold.fill_(float("inf"))
    opt = torch.optim.Adam(wm.parameters(), lr=1e-3)
    x = torch.randn(cfg.n_members, cfg.batch_size, obs_dim + act_dim)
    y = torch.randn(cfg.n_members, cfg.batch_size, obs_dim + 1)
    d = torch.zeros(cfg.n_members, cfg.batch_size)

    def train_step():
        loss, _ = wm.loss(x, y, d)
        opt.zero_grad()
        loss.backward()
        opt.step()

    out = {"wm_train_samples_per_s": cfg.n_members * cfg.batch_size / timeit(train_step, 10)}
    o, a = torch.randn(4096, obs_dim), torch.rand(4096, act_dim) * 2 - 1
    with torch.no_grad():
        out["wm_predict_rows_per_s"] = 4096 / timeit(lambda: wm.step(o, a), 5)
    iql = make_iql(ValueConfig(), "cpu:0")
    iql.create_impl((obs_dim,), act_dim)
    value = ValueFunctions(iql)
    value.freeze()
    planner = MPCPlanner(wm, value, PlannerConfig())  # bf16 candidate scoring where the CPU has it
    states = torch.randn(n_branches, obs_dim)
    gen = torch.Generator().manual_seed(0)
    t_batched = timeit(lambda: planner.plan(states, generator=gen), 3, warmup=1)
    fp32 = MPCPlanner(wm, value, PlannerConfig(bf16=False))
    out["planner_calls_per_s_batched_fp32"] = n_branches / timeit(lambda: fp32.plan(states, generator=gen), 3, warmup=1)
    out["planner_bf16_active"] = planner.bf16
    n_naive = min(n_branches, 16)  # the naive loop is timed on a subset and scaled per state
    t_naive = timeit(lambda: [planner.plan(states[i:i + 1], generator=gen) for i in range(n_naive)], 2, warmup=1)
    per_state_batched, per_state_naive = t_batched / n_branches, t_naive / n_naive
    out.update({
        "planner_calls_per_s_batched": 1.0 / per_state_batched,
        "planner_calls_per_s_naive": 1.0 / per_state_naive,
        "mpc_speedup_vs_naive_loop": per_state_naive / per_state_batched,
        "imagined_transitions_per_s": 1.0 / per_state_batched,  # one executed transition per planner call
        "branch_states_per_call": n_branches,
    })
    out.update(mpc_model_floor(wm, planner, states, per_state_naive, per_state_batched))
    return out, wm, value


def mpc_model_floor(wm, planner, states: torch.Tensor, per_state_naive: float, per_state_batched: float) -> dict:
    """The least time any implementation of this planner can take: its world-model evaluations alone, each as one
    batched call over all states (candidate scoring in bf16 where active, the final choice and warm start in fp32).
    naive / floor bounds the speedup that batching can give over the naive loop."""
    cfg = planner.cfg
    b, n, h = len(states), cfg.n_samples, cfg.horizon
    s_cand, a_cand = states.repeat_interleave(n, 0), torch.rand(b * n, wm.act_dim) * 2 - 1
    s_fin, a_fin = states.repeat_interleave(2, 0), torch.rand(b * 2, wm.act_dim) * 2 - 1

    def model_calls():
        with torch.no_grad():
            for _ in range(cfg.n_iterations * h):  # candidate scoring
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=planner.bf16):
                    wm.predict_elites(s_cand, a_cand)
            for _ in range(h):  # final fp32 choice (best plan vs warm start) and the warm start's own rollout
                wm.predict_elites(s_fin, a_fin)
                wm.predict_elites(states, a_fin[:b])

    floor = timeit(model_calls, 3, warmup=1) / b
    return {"mpc_model_floor_s_per_state": floor,
            "mpc_batched_share_in_world_model": floor / per_state_batched,
            "mpc_speedup_ceiling_vs_naive_loop": per_state_naive / floor}


def planner_bf16_quality(model: str, minari_path: str, dataset_id: str, n_states: int = 512) -> dict:
    """Plans chosen with bf16 scoring vs fp32 scoring, both rescored in fp32 with a trained model (same seed)."""
    import os

    from ipd_agent import load_ipd, load_minari
    from ipd_agent.planner import MPCPlanner

    os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(minari_path)
    algo = load_ipd(model)
    traj, _ = load_minari(dataset_id)
    rows = np.random.default_rng(1).choice(traj.n_transitions, n_states, replace=False)
    states = torch.from_numpy(traj.observations[rows])
    out = {"model": model, "states": n_states}
    ref = MPCPlanner(algo.impl.world_model, algo.impl.value, dataclasses.replace(algo.config.planner, bf16=False))
    for bf16 in (False, True):
        planner = MPCPlanner(algo.impl.world_model, algo.impl.value,
                             dataclasses.replace(algo.config.planner, bf16=bf16))
        t0 = time.perf_counter()
        _, info = planner.plan(states, generator=torch.Generator().manual_seed(0), return_info=True)
        out[f"{'bf16' if bf16 else 'fp32'}_plan_s"] = time.perf_counter() - t0
        out[f"{'bf16' if bf16 else 'fp32'}_plans_fp32_score_mean"] = float(ref.score(states, info["plan"][:, None]).mean())
    return out


def inference(obs_dim: int, act_dim: int, hidden: int, layers: int, k: int, dt) -> dict:
    import tempfile

    from ipd_agent.algo import IPDConfig

    algo = IPDConfig(context_size=k, transformer={"hidden_size": hidden, "n_layers": layers}).create("cpu:0")
    algo.create_impl((obs_dim,), act_dim)
    algo.impl.token.fitted.fill_(True)  # untrained weights, same cost: times the default (learned return token) path
    wrapper = algo.as_stateful_wrapper()
    obs = np.random.default_rng(0).normal(size=obs_dim).astype(np.float32)
    for _ in range(k):  # fill the context so we time the steady state
        wrapper.predict(obs, 0.0)
    out = {"ours_ms_per_step": 1e3 * timeit(lambda: wrapper.predict(obs, 0.0), 200, warmup=20)}
    dtw = dt.as_stateful_wrapper(target_return=1000.0)
    for _ in range(k):
        dtw.predict(obs, 0.0)
    out["d3rlpy_dt_ms_per_step"] = 1e3 * timeit(lambda: dtw.predict(obs, 0.0), 200, warmup=20)
    with tempfile.TemporaryDirectory() as d:
        algo.save_policy(f"{d}/p.pt")
        ts = torch.jit.load(f"{d}/p.pt")
        o = torch.from_numpy(np.tile(obs, (k, 1)))
        a = torch.zeros(k, act_dim)
        with torch.no_grad():
            out["torchscript_ms_per_step"] = 1e3 * timeit(lambda: ts(o, a), 200, warmup=20)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=128, help="transformer width (d3rlpy DT-sized comparison)")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--context", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--branches", type=int, default=256, help="branch states planned in one batched call")
    p.add_argument("--steps", type=int, default=20, help="timed transformer steps per implementation")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--minari-path", default="../shared/datasets", help="for the bf16 accuracy check")
    p.add_argument("--accuracy-steps", type=int, default=1500, help="training steps of the bf16 accuracy check; 0 skips")
    p.add_argument("--mpc-only", action="store_true", help="only the world-model and MPC figures (section 3, and the "
                   "--model planning check)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of a training step and "
                   "of a planner call")
    p.add_argument("--profile-only", action="store_true", help="only print the profiles")
    p.add_argument("--model", default=None, help="a fitted IPD (.d3): also check bf16 planning quality with it")
    p.add_argument("--model-dataset", default="d4rlstyle/hopper/medium-replay-v0", help="the data --model was fit on")
    a = p.parse_args()
    torch.set_num_threads(1)
    obs_dim, act_dim = 11, 3  # Hopper-sized
    res = {"threads": torch.get_num_threads(), "hidden": a.hidden, "layers": a.layers, "context": a.context,
           "batch": a.batch}
    if a.profile or a.profile_only:
        for bf16 in (False, True):
            print(f"--- torch.profiler, our transformer, {'bf16' if bf16 else 'fp32'}, 10 training steps ---")
            print(profile_transformer(obs_dim, act_dim, a.hidden, a.layers, a.context, a.batch, bf16), flush=True)
        for bf16 in (False, True):
            print(f"--- torch.profiler, MPC planner, {'bf16' if bf16 else 'fp32'} ranking, {a.branches} states ---")
            print(profile_planner(obs_dim, act_dim, a.branches, bf16), flush=True)
        if a.profile_only:
            return
    full = not a.mpc_only  # --mpc-only: section 3 (and the --model planning check) alone
    if full and a.accuracy_steps:
        res["bf16_accuracy"] = bf16_accuracy(a.minari_path, "d4rlstyle/hopper/medium-replay-v0", 64, 2, a.context,
                                             a.batch, a.accuracy_steps)
        print(json.dumps(res["bf16_accuracy"], indent=1), flush=True)
    if full:
        res["transformer_steps_per_s"], dt = transformer_training(obs_dim, act_dim, a.hidden, a.layers, a.context,
                                                                  a.batch, a.steps)
        print(json.dumps(res["transformer_steps_per_s"], indent=1), flush=True)
    res["world_model_and_mpc"], _, _ = world_model_and_planner(obs_dim, act_dim, a.branches)
    print(json.dumps(res["world_model_and_mpc"], indent=1), flush=True)
    if a.model:
        res["planner_bf16_quality"] = planner_bf16_quality(a.model, a.minari_path, a.model_dataset)
        print(json.dumps(res["planner_bf16_quality"], indent=1), flush=True)
    if full:
        res["inference"] = inference(obs_dim, act_dim, a.hidden, a.layers, a.context, dt)
        print(json.dumps(res["inference"], indent=1), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
