"""Deploy a run's candidate weights together: the median action of the six policies ``select_deployment.py`` keeps.

``select_deployment.py`` found that no offline criterion can pick, per run, which of one training run's candidate
weights to deploy, although the best of them beats the final weights by up to +8.2 ± 3.6 points (an upper bound). A
deployment that needs no ranking is to run them all and execute, at every step, the element-wise median of their
actions: a candidate that is about to make the hopper fall is outvoted when the others are not.

One IPD fit under the profile, exactly as ``select_deployment.py`` fits it (the same stage caches and seeds, so its
candidates are that script's candidates), then two evaluations on the table's env seeds:
  - ``final``: what ``fit`` returns, the control (it must repeat ``select_deployment``'s ``final`` of the same seed);
  - ``median``: every candidate runs its own transformer context on the same observations; the executed action is the
    element-wise median of their actions, and every context records that executed action as its action token (as a
    single policy's context records its own).

    python benchmarks/deploy_together.py --datasets d4rlstyle/hopper/full-replay-v0 --seeds 0 1 \\
        --minari-path ../shared/datasets --out benchmarks/results/deploy_together \\
        --cache benchmarks/results/select_deployment
    python benchmarks/deploy_together.py --report --out benchmarks/results/deploy_together
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pooled_seeds import standard_error  # noqa: E402
from run_args import RESULTS, run_parser, write_report  # noqa: E402
from select_deployment import CONTROL, train_candidates  # noqa: E402


class MedianOfPolicies:
    """d3rlpy's stateful protocol (``predict(x, reward)``, ``reset()``) over several IPD transformer contexts: the
    executed action is the element-wise median of theirs. ``weight_sets``: weight sets of one model, each run with
    ``algo``'s return token; ``contexts``: ready contexts instead (members with their own models, ``seed_ensemble.py``)."""

    def __init__(self, algo=None, weight_sets: list = (), contexts: list | None = None) -> None:
        from ipd_agent.policy import TransformerContext
        from ipd_agent.transformer import set_parameters

        self.contexts = list(contexts or [])
        for weights in weight_sets:
            net = copy.deepcopy(algo.impl.transformer).eval()
            set_parameters(net, weights)
            ctx = TransformerContext(algo, 1)  # the model's return token, deployment settings and device
            ctx.nets = [net]  # ... with this candidate's transformer
            self.contexts.append(ctx)

    def predict(self, x: np.ndarray, reward: float = 0.0) -> np.ndarray:
        import torch

        from ipd_agent.policy import median_action  # the rule fit's n_members deploys

        obs = np.asarray(x, dtype=np.float32)[None]
        acts = [torch.as_tensor(c.step(obs, np.array([reward], np.float32))[0]) for c in self.contexts]
        action = median_action(acts).numpy().astype(np.float32)
        for c in self.contexts:  # the executed action, not the candidate's own, is what happened at this step
            c.act[0, int(c.length[0]) - 1] = torch.as_tensor(action, device=c.device)
        return action

    def reset(self) -> None:
        for c in self.contexts:
            c.reset()


def row_file(out_dir: str, dataset_id: str, seed: int) -> str:
    return os.path.join(out_dir, "runs", dataset_id.replace("/", "__"), f"together_seed{seed}.json")


def run(dataset_id: str, seed: int, out_dir: str, cache_dir: str, profile="cpu", dataset_root: str | None = None) -> dict:
    """Fits once, evaluates ``final`` and the median of all candidates; one JSON per (dataset, seed), read back if
    it exists."""
    from ipd_agent.bench import evaluate, versions, write_row
    from ipd_agent.data import normalized_score

    path = row_file(out_dir, dataset_id, seed)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    fit = train_candidates(dataset_id, seed, cache_dir, profile, dataset_root)
    algo, kept, meta, ref, profile = fit["algo"], fit["kept"], fit["meta"], fit["ref"], fit["profile"]
    env = meta.get("env_spec") or meta["env_id"]
    results = {}  # the network holds the final weights, as fit left them: the control runs the model itself
    for name, policy in ((CONTROL, None), ("median", MedianOfPolicies(algo, list(kept.values())))):
        t0 = time.perf_counter()
        rets = evaluate(algo, env, profile.eval_episodes, seed, policy=policy)
        results[name] = {"normalized_score": float(np.mean([normalized_score(r, ref) for r in rets])),
                         "returns": [float(r) for r in rets], "eval_time_s": time.perf_counter() - t0}
        print(f"{dataset_id} seed {seed} {name}: {results[name]['normalized_score']:.1f}", flush=True)
    row = {"dataset": dataset_id, "seed": seed, "control": CONTROL, "members": list(kept), "results": results,
           "train_wall_time_s": fit["train_time"], "stage_times_s": fit["stage_times"],
           "profile": profile.name, "versions": versions(), "config": json.loads(fit["cfg"].serialize())}
    write_row(path, row)
    return row


def report(rows: list[dict]) -> str:
    """Per run the control and the median's score; then the paired gain, per set and over all runs."""
    rows = sorted(rows, key=lambda r: (r["dataset"], r["seed"]))
    lines = ["| set | seed | final (control) | median of all candidates | gain |", "|---|---|---|---|---|"]
    for r in rows:
        f, m = r["results"][CONTROL]["normalized_score"], r["results"]["median"]["normalized_score"]
        lines.append(f"| {r['dataset'].split('/', 1)[-1]} | {r['seed']} | {f:.1f} | {m:.1f} | {m - f:+.1f} |")
    lines += ["", "Paired gain of the median over the control (mean ± SE over runs; same training run):", "",
              "| | gain |", "|---|---|"]
    for ds in sorted({r["dataset"] for r in rows}) + ["all"]:
        sub = rows if ds == "all" else [r for r in rows if r["dataset"] == ds]
        g = np.asarray([r["results"]["median"]["normalized_score"] - r["results"][CONTROL]["normalized_score"]
                        for r in sub])
        lines.append(f"| {'all runs' if ds == 'all' else ds.split('/', 1)[-1]} (n = {len(sub)}) | "
                     f"{g.mean():+.1f} ± {standard_error(g):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = run_parser(__doc__, "deploy_together", report=True)
    p.add_argument("--cache", default=os.path.join(RESULTS, "select_deployment"),
                   help="folder whose cache/ holds (or gets) the runs' stages 1-2: select_deployment's, so its "
                        "candidates are these")
    a = p.parse_args()
    for ds in a.datasets:
        for seed in a.seeds:
            run(ds, seed, a.out, a.cache, a.profile, a.minari_path)
    if a.report:
        write_report(a.out, "together_seed*.json", report, "deploy_together.py")


if __name__ == "__main__":
    main()
