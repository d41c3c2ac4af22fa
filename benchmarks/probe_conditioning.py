"""What does a fitted IPD do at the episode start states, for several return tokens?

Prints V at the dataset's episode starts (vs. over the data) and, for models trained with
``transformer.return_token="upper"``, the token model's value there; then, at those states, the transformer's action size
and IQL's Q of it when the return token is V(s0) and when it is larger, next to IQL's policy and the data's
own first actions. A low V(s0) that yields near-zero actions is the fixed point that stops the halfcheetah runs.

    python benchmarks/probe_conditioning.py \\
        --model benchmarks/results/head_to_head/models/d4rlstyle__halfcheetah__full-replay-v0/ipd_seed0.d3 \\
        --dataset d4rlstyle/halfcheetah/full-replay-v0
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--minari-path", default="../shared/datasets")
    p.add_argument("--tokens", type=float, nargs="+", default=[300.0, 600.0, 1000.0], help="fixed tokens to try")
    a = p.parse_args()
    torch.set_num_threads(1)
    os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(a.minari_path)
    from ipd_agent import load_ipd, load_minari

    algo = load_ipd(a.model)
    traj, _ = load_minari(a.dataset)
    impl, net = algo.impl, algo.impl.transformer.eval()
    o0 = torch.from_numpy(traj.observations[traj.episode_starts[:-1]])
    n = len(o0)
    out: dict = {"dataset": a.dataset, "episode_starts": n}
    with torch.no_grad():
        v0 = impl.value.v(o0)
        out["V_at_starts_mean"] = float(v0.mean())
        out["V_over_data_mean"] = float(impl.value.v(torch.from_numpy(traj.observations[::50])).mean())
        probes = [("token=V(s0)", v0)]
        if bool(impl.token.fitted):  # a model trained with transformer.return_token="upper"
            g0 = impl.token(o0)
            out["upper_token_at_starts_mean"] = float(g0.mean())
            probes.append(("token=upper(s0)", g0))
        for name, g in probes + [(f"token={t:g}", torch.full((n,), t)) for t in a.tokens]:
            act = net(o0[:, None], torch.zeros(n, 1, traj.action_dim), g[:, None])[:, 0]
            out[name] = {"mean_abs_action": float(act.abs().mean()), "Q": float(impl.value.q(o0, act).mean())}
        pi = impl.value.act(o0)
        out["iql_policy"] = {"mean_abs_action": float(pi.abs().mean()), "Q": float(impl.value.q(o0, pi).mean())}
        a0 = torch.from_numpy(traj.actions[traj.episode_starts[:-1]])
        out["data_first_action"] = {"mean_abs_action": float(a0.abs().mean()), "Q": float(impl.value.q(o0, a0).mean())}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
