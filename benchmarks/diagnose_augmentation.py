"""Are IPD's imagined rollouts really better? Replays every imagined segment in the real MuJoCo simulator.

For each branch the planner started, the simulator is put in the branch state (MuJoCo observations of these
tasks are qpos[1:] and qvel, and the dropped x position does not affect the dynamics), the imagined actions are
executed, and three values of the same segment are compared:
  model     what augmentation believed: Σγ^j r̂_j + γ^ℓ V(ŝ_ℓ) in the world model (the acceptance test used it)
  executed  the same actions in the simulator: Σγ^j r_j + γ^ℓ V(s_ℓ), nothing after a real termination
  data      the dataset's own segment from that state (what the rollout had to beat)
plus the world model's one-step error from the true states and its compounding error along the rollout.

    python benchmarks/diagnose_augmentation.py --model benchmarks/results/head_to_head/models/d4rlstyle__hopper__medium-replay-v0/ipd_seed0.d3 \\
        --dataset d4rlstyle/hopper/medium-replay-v0 --out benchmarks/results/diagnostics/hopper-mr_seed0.json

The augmentation is re-run from the saved model (it is deterministic for a given seed, so it is the one the
transformer was trained on).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a fitted IPD (.d3), e.g. one the benchmark kept")
    p.add_argument("--dataset", required=True)
    p.add_argument("--minari-path", default="../shared/datasets")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    a = p.parse_args()
    torch.set_num_threads(1)
    os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(a.minari_path)
    import gymnasium as gym

    from ipd_agent import load_ipd, load_minari

    algo = load_ipd(a.model)
    traj, meta = load_minari(a.dataset)
    res = algo.augment(traj, show_progress=True)
    gamma, value, wm = algo.config.gamma, algo.impl.value, algo.impl.world_model
    env = gym.make(meta.get("env_spec") or meta["env_id"])
    env.reset(seed=0)
    sim = env.unwrapped
    nq = sim.model.nq
    t = res.trajectories
    model_v, exec_v, data_v, accepted, lengths, real_term = [], [], [], [], [], []
    one_step_err, compound_err, reward_err, recon_err = [], [], [], []
    obs_std = traj.observations.std(0) + 1e-6
    for i, row in enumerate(res.branch_rows):
        rows = np.flatnonzero(t.imagined & (t.branch_ids == i))
        if len(rows) == 0:  # rejected rollouts were not spliced in: nothing to replay
            continue
        s0 = traj.observations[row]
        sim.set_state(np.concatenate([[0.0], s0[:nq - 1]]), s0[nq - 1:])
        recon_err.append(float(np.abs(sim._get_obs() - s0).max()))
        g, disc, s, terminated = 0.0, 1.0, s0, False
        true_obs = []
        for j, r in enumerate(rows):
            nxt, rew, term, _, _ = env.step(t.actions[r])
            true_obs.append((s, nxt))
            g += disc * rew
            reward_err.append(abs(float(rew) - float(t.rewards[r])))
            compound_err.append(float(np.linalg.norm((t.next_observations[r] - nxt) / obs_std)))
            disc *= gamma
            s = nxt
            if term:
                terminated = True
                break
        with torch.no_grad():
            if not terminated:
                g += disc * float(value.v(torch.as_tensor(s, dtype=torch.float32)[None])[0])
            o = torch.as_tensor(np.array([x[0] for x in true_obs]), dtype=torch.float32)
            act = torch.as_tensor(t.actions[rows[:len(true_obs)]], dtype=torch.float32)
            mean, _, _ = wm.predict_elites(o, act)
            pred, _ = wm.denormalise(mean.mean(0), o)
        true_next = np.array([x[1] for x in true_obs])
        one_step_err += list(np.linalg.norm((pred.numpy() - true_next) / obs_std, axis=1))
        model_v.append(float(res.imagined_values[i]))
        exec_v.append(g)
        data_v.append(float(res.real_values[i]))
        accepted.append(bool(res.accepted[i]))
        lengths.append(len(rows))
        real_term.append(terminated)
    model_v, exec_v, data_v = map(np.array, (model_v, exec_v, data_v))
    out = {
        "dataset": a.dataset, "model": a.model, "spliced_rollouts": len(model_v),
        "state_reconstruction_max_abs_error": float(np.max(recon_err)) if recon_err else None,
        "mean_rollout_length": float(np.mean(lengths)),
        "value_model_mean": float(model_v.mean()), "value_executed_mean": float(exec_v.mean()),
        "value_data_mean": float(data_v.mean()),
        "model_optimism_mean": float((model_v - exec_v).mean()),
        "executed_beats_data_fraction": float((exec_v > data_v).mean()),
        "executed_gain_over_data_mean": float((exec_v - data_v).mean()),
        "terminated_in_simulator_fraction": float(np.mean(real_term)),
        "one_step_error_mean_std_units": float(np.mean(one_step_err)),
        "compounding_error_mean_std_units": float(np.mean(compound_err)),
        "reward_abs_error_mean": float(np.mean(reward_err)),
        "acceptance": res.summary(),
    }
    print(json.dumps(out, indent=1))
    if a.out:
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
