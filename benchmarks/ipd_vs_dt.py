"""IPD vs d3rlpy DecisionTransformer on one dataset: same data, same transformer size and step budget.

Also runs two IPD ablations on the same seeds (no value guidance; no augmentation) to show where the
difference comes from. Value function and world model are fitted once per seed and shared by the variants.
The committed results predate the CPU profile's switch to alpha = 0; since then "ipd" and "ipd-no-guidance" are the
same configuration under ``--profile cpu``.

    python benchmarks/ipd_vs_dt.py --minari-path ../shared/datasets            # CPU profile, 3 seeds
    python benchmarks/ipd_vs_dt.py --profile tiny --seeds 0                     # a quick look
"""
import argparse
import glob
import json
import os

from ipd_agent.bench import load_profile, markdown_table, run_sweep

VARIANTS = [
    {"algo": "ipd"},
    {"algo": "dt"},
    {"algo": "ipd", "tag": "no-guidance", "ipd_overrides": {"transformer": {"value_guidance": 0.0}}},
    {"algo": "ipd", "tag": "no-augment", "ipd_overrides": {"augment": {"enabled": False}}},
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="d4rlstyle/hopper/medium-replay-v0")
    p.add_argument("--minari-path", default=os.environ.get("MINARI_DATASETS_PATH", "../shared/datasets"))
    p.add_argument("--profile", default="cpu", help="cpu, tiny, gpu or a JSON file")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/ipd_vs_dt")
    p.add_argument("--variants", nargs="+", default=None, help="subset of: ipd dt ipd-no-guidance ipd-no-augment")
    a = p.parse_args()
    prof = load_profile(a.profile)
    variants = VARIANTS
    if a.variants:
        variants = [v for v in VARIANTS if (v["algo"] + ("-" + v["tag"] if v.get("tag") else "")) in a.variants]
    # main comparison first (all seeds), ablations after
    jobs = [{**v, "dataset": a.dataset, "seed": s} for v in variants for s in a.seeds]
    run_sweep(jobs, prof, a.out, workers=a.workers, dataset_root=os.path.abspath(a.minari_path))
    # the table covers every finished run in the results folder (earlier invocations included)
    rows = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(a.out, "runs", "*", "*.json")))]
    table = markdown_table(rows, [l for l in ("ipd", "dt", "ipd-no-guidance", "ipd-no-augment")
                                  if any(r["algo"] == l for r in rows)])
    times = {}
    for r in rows:
        if r["algo"] == "ipd":
            for k, v in r["stage_times_s"].items():
                times.setdefault(k, []).append(v)
    seeds = sorted({r["seed"] for r in rows})
    commits = sorted({str(r["versions"].get("git_commit")) for r in rows})
    lines = [f"profile `{prof.name}`, seeds {seeds}, {prof.eval_episodes} evaluation episodes, last iterate, "
             f"normalised score mean ± std over seeds (n per cell in results.json); code: {', '.join(commits)}", "",
             table, "", "IPD wall time per stage (s, mean over seeds): " +
             ", ".join(f"{k} {sum(v) / len(v):.0f}" for k, v in times.items())]
    print("\n".join(lines))
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
