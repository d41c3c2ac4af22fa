"""Can the world model pick the return token offline? (a negative result, kept so it can be re-checked)

For one trained IPD, each token setting (g = V(s), and the token model at several expectiles) is scored by rolling
the transformer policy out in the world model from up to ``--n`` dataset start states for ``--horizon`` steps
(one random elite per step, as in the augmentation), stopping at a predicted terminal or where uncertainty exceeds
kappa: ``stop0`` counts nothing after such a stop, ``stopV`` bootstraps with V at an uncertainty stop. Compare the
ranking with the real scores from ``token_sensitivity.py``.

    python benchmarks/token_model_estimate.py \
        --model benchmarks/results/head_to_head/models/d4rlstyle__hopper__medium-replay-v0/ipd_seed0.d3 \
        --dataset d4rlstyle/hopper/medium-replay-v0
"""
import argparse
import json
import os

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--horizon", type=int, default=200, help="imagined steps per rollout")
    p.add_argument("--n", type=int, default=100, help="dataset start states rolled out from")
    p.add_argument("--minari-path", default="../shared/datasets")
    p.add_argument("--expectiles", type=float, nargs="+", default=[0.9, 0.97, 0.99])
    a = p.parse_args()
    torch.set_num_threads(1)
    os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(a.minari_path)
    from ipd_agent import load_ipd, load_minari
    from ipd_agent.policy import TransformerContext

    algo = load_ipd(a.model)
    traj, _ = load_minari(a.dataset)
    impl, gamma = algo.impl, algo.config.gamma
    wm = impl.world_model.eval()
    aug = algo.augment(traj, show_progress=False)  # the token model is fitted on the training tokens
    starts = traj.observations[traj.episode_starts[:-1]]
    rng = np.random.default_rng(0)
    s0 = torch.from_numpy(starts[rng.choice(len(starts), min(a.n, len(starts)), replace=False)])
    kappa = float(wm.threshold)
    res = {}
    for e in ["value"] + a.expectiles:
        if e == "value":
            algo.config.transformer.return_token = "value"
        else:
            algo.config.transformer.return_token = "upper"
            algo.fit_return_token(aug, expectile=e)
        for pess in ("stop0", "stopV"):
            gen = torch.Generator().manual_seed(0)  # the same imagined noise for every setting
            ctx = TransformerContext(algo, len(s0), "value")
            s = s0.clone()
            alive = torch.ones(len(s0), dtype=torch.bool)
            ret, lens, disc = torch.zeros(len(s0)), torch.zeros(len(s0)), 1.0
            with torch.no_grad():
                for _ in range(a.horizon):
                    act = torch.from_numpy(ctx.step(s.numpy()))
                    nxt, r, term, u = wm.step(s, act, generator=gen)
                    ret += torch.where(alive, disc * r, torch.zeros_like(r))
                    lens += alive.float()
                    unc = u > kappa
                    stop = alive & (term | unc)
                    if pess == "stopV":  # bootstrap with V where the model stopped being trusted (not at terminals)
                        boot = alive & unc & ~term
                        ret += torch.where(boot, disc * gamma * impl.value.v(nxt), torch.zeros_like(r))
                    alive = alive & ~stop
                    disc *= gamma
                    s = nxt
                ret += torch.where(alive, disc * impl.value.v(s), torch.zeros_like(ret))
            res[f"{e}/{pess}"] = {"est": float(ret.mean()), "len": float(lens.mean())}
            print(e, pess, res[f"{e}/{pess}"], flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
