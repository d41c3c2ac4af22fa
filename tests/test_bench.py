"""The benchmark harness: real d3rlpy baselines and IPD on one real Minari file, in worker processes."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

import numpy as np
import pytest
import torch

from ipd_agent.bench import Profile, markdown_table, run_sweep
from ipd_agent.config import native_cpu_bf16

from conftest import acts_alike, write_minari

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"  # scripts and their profiles

PROFILE = Profile(
    name="test", q_steps=200, transformer_steps=40, transformer_hidden=32, transformer_layers=1, eval_episodes=2,
    curve_points=2, curve_episodes=1,
    ipd={"context_size": 5, "value": {"hidden_units": [64, 64]},
         "world_model": {"max_steps": 200, "eval_every": 100, "hidden_size": 32, "n_layers": 2},
         "planner": {"n_samples": 16, "n_iterations": 2}, "augment": {"n_branches": 32, "segment_length": 5}},
)


def test_sweep_rows_curves_and_resume(hopper_episodes, tmp_path):
    root = tmp_path / "datasets"
    write_minari(root, "ipdtest/hopper-random-v0", "Hopper-v5", hopper_episodes[:40])
    jobs = [{"algo": a, "dataset": "ipdtest/hopper-random-v0", "seed": 0} for a in ("ipd", "bc")]
    out = str(tmp_path / "results")
    rows = run_sweep(jobs, PROFILE, out, workers=2, dataset_root=str(root), show_progress=False)
    by_algo = {r["algo"]: r for r in rows}
    assert set(by_algo) == {"ipd", "bc"}
    for name, r in by_algo.items():
        steps = [p["step"] for p in r["learning_curve"]]
        assert steps == [r["gradient_steps"] // 2, r["gradient_steps"]], name
        assert r["learning_curve"][-1]["normalized_score"] == r["normalized_score"]
        assert len(r["returns"]) == PROFILE.eval_episodes and r["peak_rss_mib"] > 0
        assert r["versions"]["d3rlpy"] and r["config"] and r["profile"]["q_steps"] == 200
        assert r["versions"]["cpu_bf16"] == native_cpu_bf16()  # the precision the transformer trained in
        assert r["versions"]["cpu"].split("+")[0] == torch.backends.cpu.get_cpu_capability()  # the kernel tier
    assert by_algo["bc"]["gradient_steps"] == 200 and by_algo["ipd"]["gradient_steps"] == 40
    assert set(by_algo["ipd"]["stage_times_s"]) == {"value", "world_model", "augment", "transformer"}
    assert by_algo["ipd"]["augmentation"]["n_branches"] > 0
    assert by_algo["ipd"]["config"]["transformer"]["hidden_size"] == 32  # the profile reached the model
    tr = by_algo["ipd"]["target_rtg"]  # the fixed-target-return ablation of the same model
    assert len(tr["returns"]) == PROFILE.eval_episodes and np.isfinite(tr["target"])
    assert (tmp_path / "results" / "models" / "ipdtest__hopper-random-v0" / "ipd_seed0.d3").exists()
    # finished runs are read back, not re-run
    t0 = time.perf_counter()
    again = run_sweep(jobs, PROFILE, out, workers=1, dataset_root=str(root), show_progress=False)
    assert time.perf_counter() - t0 < 5  # read back in this process: no worker starts, nothing is trained
    assert sorted(again, key=lambda r: r["algo"]) == sorted(rows, key=lambda r: r["algo"])
    table = markdown_table(rows, ["ipd", "bc"])
    assert "ipdtest/hopper-random-v0" in table and table.count("±") == 2
    # `ipd-agent bench` on the same folder reads the finished runs back and writes every output of the issue
    import csv

    import matplotlib.image

    from ipd_agent.cli import main as cli_main

    (tmp_path / "profile.json").write_text(json.dumps(dataclasses.asdict(PROFILE)))
    assert cli_main(["bench", "--profile", str(tmp_path / "profile.json"), "--datasets", "ipdtest/hopper-random-v0",
                     "--algos", "ipd", "bc", "--seeds", "0", "--minari-path", str(root), "--out", out]) == 0
    with open(os.path.join(out, "results.csv")) as f:
        lines = list(csv.DictReader(f))
    assert {x["algo"]: (float(x["normalized_score"]), x["git_commit"]) for x in lines} == {
        r["algo"]: (r["normalized_score"], str(r["versions"]["git_commit"])) for r in rows}
    assert len(json.load(open(os.path.join(out, "results.json")))) == 2
    assert open(os.path.join(out, "table.md")).read().strip() == table
    for png in ("bars.png", "curves.png"):
        assert matplotlib.image.imread(os.path.join(out, png)).shape[0] > 100, png  # a drawn figure, not a stub


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for d in pathlib.Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append((int(d.name), (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except (OSError, ValueError, IndexError):  # the process ended while we looked
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status is left


@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_killing_a_sweep_ends_its_workers(hopper_episodes, tmp_path):
    """A sweep killed outright (SIGKILL: no handler runs) takes its worker with it instead of leaving an orphan that
    trains on; the run it held wrote no row, so resuming re-runs it."""
    import signal
    import subprocess
    import sys

    root = tmp_path / "datasets"
    write_minari(root, "ipdtest/hopper-random-v0", "Hopper-v5", hopper_episodes[:40])
    long_bc = {**dataclasses.asdict(PROFILE), "q_steps": 10**7}  # far longer than the test: only a kill can end it
    script = tmp_path / "sweep.py"
    script.write_text(
        "from ipd_agent.bench import Profile, run_sweep\n"
        "if __name__ == '__main__':  # spawned workers import this file: only the sweep's process runs the sweep\n"
        f"    run_sweep([{{'algo': 'bc', 'dataset': 'ipdtest/hopper-random-v0', 'seed': 0}}], Profile(**{long_bc!r}), "
        f"{str(tmp_path / 'results')!r}, workers=1, dataset_root={str(root)!r}, show_progress=False)\n")
    sweep = subprocess.Popen([sys.executable, str(script)])
    worker = None
    try:
        deadline = time.time() + 120
        while worker is None and time.time() < deadline and sweep.poll() is None:
            worker = next((p for p, cmd in _children(sweep.pid) if "spawn_main" in cmd), None)
            time.sleep(0.2)
        assert worker is not None, "the sweep never started a worker"
        time.sleep(3)  # let it get into the run
        assert _alive(worker)
        sweep.send_signal(signal.SIGKILL)
        sweep.wait()
        deadline = time.time() + 30
        while _alive(worker) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), "the worker outlived the sweep that started it"
        assert not (tmp_path / "results" / "runs" / "ipdtest__hopper-random-v0" / "bc_seed0.json").exists()
    finally:
        if sweep.poll() is None:
            sweep.kill()
        if worker is not None and _alive(worker):  # the failure case: do not leave it running
            os.kill(worker, signal.SIGKILL)


def test_a_script_without_a_main_guard_gets_a_clear_error(hopper_episodes, tmp_path):
    """run_sweep at the top level of a script: the spawned workers import the script again and die; the sweep says
    why and what to do instead of ending in BrokenProcessPool."""
    import subprocess
    import sys

    root = tmp_path / "datasets"
    write_minari(root, "ipdtest/hopper-random-v0", "Hopper-v5", hopper_episodes[:10])
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from ipd_agent.bench import Profile, run_sweep\n"
        f"run_sweep([{{'algo': 'bc', 'dataset': 'ipdtest/hopper-random-v0', 'seed': 0}}], "
        f"Profile(**{dataclasses.asdict(PROFILE)!r}), {str(tmp_path / 'results')!r}, workers=1, "
        f"dataset_root={str(root)!r}, show_progress=False)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "RuntimeError: A worker process of the sweep died" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr


def test_the_same_sweep_runs_on_ray(hopper_episodes, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is the optional 'ray' extra (scripts/setup.sh installs it)")
    try:  # a machine that cannot host a local Ray cluster at all (e.g. no shared memory) is not our bug
        ray.init(include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Ray cannot start a local cluster here: {exc}")
    finally:
        ray.shutdown()
    root = tmp_path / "datasets"
    write_minari(root, "ipdtest/hopper-random-v0", "Hopper-v5", hopper_episodes[:40])
    jobs = [{"algo": a, "dataset": "ipdtest/hopper-random-v0", "seed": 1} for a in ("ipd", "bc")]
    out = tmp_path / "results"
    rows = run_sweep(jobs, PROFILE, str(out), dataset_root=str(root), show_progress=False, ray_address="local")
    assert sorted(r["algo"] for r in rows) == ["bc", "ipd"]
    assert all(np.isfinite(r["normalized_score"]) and len(r["learning_curve"]) == 2 for r in rows)
    for r in rows:  # written where the driver runs
        assert (out / "runs" / "ipdtest__hopper-random-v0" / f"{r['algo']}_seed1.json").exists()


def test_stages_one_and_two_are_planned_once_per_setting(tmp_path):
    from ipd_agent.bench import _prefits_needed, row_path, write_row

    d = "ipdtest/hopper-random-v0"
    jobs = [{"algo": "ipd", "dataset": d, "seed": 0},
            {"algo": "ipd", "tag": "no-guidance", "dataset": d, "seed": 0,  # transformer-only change: shares the cache
             "ipd_overrides": {"transformer": {"value_guidance": 0.0}}},
            {"algo": "ipd", "tag": "dt-layout", "dataset": d, "seed": 0,  # so does the transformer's architecture
             "ipd_overrides": {"transformer": {"tokens_per_step": 3, "n_layers": 2}}},
            {"algo": "ipd", "tag": "big-wm", "dataset": d, "seed": 0,  # world-model change: needs its own fit
             "ipd_overrides": {"world_model": {"hidden_size": 64}}},
            {"algo": "ipd", "dataset": d, "seed": 1},
            {"algo": "bc", "dataset": d, "seed": 0}]
    needed = _prefits_needed(jobs, PROFILE, str(tmp_path))
    assert [(j.get("tag", ""), j["seed"]) for j in needed] == [("", 0), ("big-wm", 0), ("", 1)]
    write_row(row_path(str(tmp_path), d, "ipd", 1), {"algo": "ipd"})  # a finished run needs no prefit
    assert [(j.get("tag", ""), j["seed"]) for j in _prefits_needed(jobs, PROFILE, str(tmp_path))] == [("", 0),
                                                                                                     ("big-wm", 0)]


def test_transformer_variants_share_stages_one_and_two_whatever_runs_first(tmp_path, hopper_traj):
    """Stages 1-2 are fitted once, under the profile's own transformer: a variant with another token layout gets the
    same value function and world model as ``ipd`` whether it runs first or second, and its transformer starts from
    exactly the weights a fresh model with its own settings would have."""
    import torch

    from ipd_agent.bench import make_ipd_config, prefit_ipd, stage_config

    d = "ipdtest/hopper-random-v0"
    layout_overrides = {"transformer": {"tokens_per_step": 3}}
    base, layout = make_ipd_config(PROFILE, 0, None), make_ipd_config(PROFILE, 0, layout_overrides)
    first, times = prefit_ipd(base, hopper_traj, d, str(tmp_path / "a"), stage_config(PROFILE, 0, None))
    t0 = time.perf_counter()
    second, times2 = prefit_ipd(layout, hopper_traj, d, str(tmp_path / "a"), stage_config(PROFILE, 0, layout_overrides))
    assert time.perf_counter() - t0 < 0.5 * (times["value"] + times["world_model"])  # loaded, not refitted
    assert times2 == times and len(list((tmp_path / "a" / "cache").glob("*.d3"))) == 1
    # the layout variant first, in a fresh folder: the same stages
    alone, _ = prefit_ipd(layout, hopper_traj, d, str(tmp_path / "b"), stage_config(PROFILE, 0, layout_overrides))
    assert second.config.transformer.tokens_per_step == 3 and second.impl.transformer.tokens == 3
    for other in (second, alone):
        for name in ("value", "world_model"):
            a, b = getattr(first.impl, name).state_dict(), getattr(other.impl, name).state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a), name
    fresh = layout.create(device="cpu:0")
    fresh.create_impl((hopper_traj.observation_dim,), hopper_traj.action_dim)
    want, got = fresh.impl.transformer.state_dict(), second.impl.transformer.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert second.impl.stages.is_done("value") and second.impl.stages.is_done("world_model")
    assert not second.impl.stages.is_done("transformer")


def _benchmark_script(name: str):
    """A script of benchmarks/ imported as a module (the folder is not a package)."""
    import importlib.util

    script = BENCHMARKS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plots_draw_diagnostics_beside_ipd_but_only_the_six_algorithms_in_a_main_table(tmp_path):
    mod = _benchmark_script("head_to_head")
    ds = "d4rlstyle/halfcheetah/full-replay-v0"

    def rows_of(*algos):
        return [{"algo": a, "dataset": ds, "seed": s, "normalized_score": 10.0 + s, "gradient_steps": 100,
                 "learning_curve": [{"step": 50, "normalized_score": 5.0}, {"step": 100, "normalized_score": 10.0 + s}]}
                for a in algos for s in (0, 1)]

    # a diagnostics folder (IPD rows only): the diagnostic is drawn, the ablation is not (it has its own table)
    assert mod.plotted_labels(rows_of("ipd-dt-layout", "ipd-no-augment", "ipd")) == ["ipd", "ipd-dt-layout"]
    # a main table: a diagnostic's rows in the same folder stay off the front-page plots
    rows = rows_of("ipd-dt-layout", "ipd-no-augment", "dt", "ipd")
    assert mod.plotted_labels(rows) == ["ipd", "dt"]
    assert mod.plots(rows, str(tmp_path), [], 1000) == ["bars.png", "curves.png"]
    # every drawn label gets its own colour, with all the diagnostics beside ipd (the 11th label used to wrap onto C0)
    every = mod.plotted_labels(rows_of("ipd", *[f"ipd-{t}" for t in mod.DIAGNOSTICS]))
    colours = mod.label_colours(every)
    assert len(every) == 1 + len(mod.DIAGNOSTICS) and len(set(colours.values())) == len(every)
    assert mod.label_colours(["dt", "ipd"]) == {"dt": "C1", "ipd": "C0"}  # the algorithms keep theirs everywhere
    # a folder of a diagnostic's rows only gets no table of means over no sets (it used to print "nan")
    table, avg = mod.main_table(rows_of("ipd-mppi-mean"))
    assert "nan" not in table and all(v is None for v in avg.values())


def test_the_ablation_table_has_a_column_for_each_variant_with_rows_and_none_without():
    """An ablation whose rows live in another folder (alpha7.5's) used to get an all-dash column in summary.md."""
    mod = _benchmark_script("head_to_head")
    algos = ("ipd", "dt", "ipd-no-augment", "ipd-branches-250", "ipd-kept-variant", "ipd-target-rtg")
    rows = [{"algo": a} for a in algos]
    assert "alpha7.5" in mod.ABLATIONS
    assert mod.ablation_labels(rows) == ["ipd", "ipd-no-augment", "ipd-kept-variant", "ipd-target-rtg"]
    with_control = mod.ablation_labels(rows + [{"algo": "ipd-alpha7.5"}, {"algo": "ipd-lr-1e-4"}])
    assert with_control[:2] == ["ipd", "ipd-lr-1e-4"] and "ipd-alpha7.5" in with_control


def test_scaling_jobs_take_volumes_as_multiples_of_the_profile_branch_points():
    """--scales: the scaling part's volumes; the default sweep is 0.25, 0.5 and 2 x (0 and 1 come from other parts)."""
    from ipd_agent.bench import load_profile

    mod = _benchmark_script("head_to_head")
    prof = load_profile("cpu")  # 1,000 branch points
    ds = "d4rlstyle/halfcheetah/full-replay-v0"
    default = mod.jobs_for("scaling", [0], prof, [], [ds])
    assert [j["ipd_overrides"]["augment"]["n_branches"] for j in default] == [250, 500, 2000]
    (four,) = mod.jobs_for("scaling", [2], prof, [], [ds], scales=[4.0])
    assert four["tag"] == "branches-4000" and four["seed"] == 2 and four["ipd_overrides"] == {"augment": {"n_branches": 4000}}


def test_the_transformer_budget_profile_differs_from_cpu_only_in_transformer_steps_and_reuses_its_stages():
    """benchmarks/profiles/cpu-transformer-10k.json: twice the transformer steps at the rate the CPU profile had when
    it ran (1e-4), nothing else, and the same cache key for stages 1-2, so its IPD runs continue the CPU profile's on
    the very value function and world model."""
    import dataclasses

    from ipd_agent.bench import _prefit_key, load_profile, make_ipd_config, stage_config

    cpu = load_profile("cpu")
    long = load_profile(str(BENCHMARKS / "profiles" / "cpu-transformer-10k.json"))
    assert long.transformer_steps == 2 * cpu.transformer_steps
    assert make_ipd_config(long, 0).transformer.learning_rate == 1e-4
    assert make_ipd_config(cpu, 0).transformer == dataclasses.replace(
        make_ipd_config(long, 0).transformer, learning_rate=3e-4, n_steps=cpu.transformer_steps)
    ipd_part = {**long.ipd, "transformer": {**long.ipd["transformer"], "learning_rate": 3e-4}}
    assert dataclasses.replace(long, name=cpu.name, transformer_steps=cpu.transformer_steps, ipd=ipd_part) == cpu
    ds = "d4rlstyle/hopper/medium-replay-v0"
    for seed in (0, 1):
        assert _prefit_key(stage_config(long, seed), ds) == _prefit_key(stage_config(cpu, seed), ds)
    assert _prefit_key(stage_config(long, 0), ds) != _prefit_key(stage_config(long, 1), ds)


def test_the_cpu_profile_trains_its_transformer_at_3e_4_and_the_lr_profile_changes_only_dts_rate():
    """Since the lr-3e-4 rule (benchmarks/PROFILE_HISTORY.md), the CPU profile's transformer trains at 3e-4 while its DT
    keeps d3rlpy's 1e-4; benchmarks/profiles/cpu-lr-3e-4.json is the CPU profile with DT at 3e-4 too. Both share the
    stages 1-2 cache, and each rate reaches the network it is for."""
    import dataclasses

    from ipd_agent.bench import _baseline, _prefit_key, load_profile, make_ipd_config, stage_config
    from ipd_agent.config import TransformerNetConfig

    cpu = load_profile("cpu")
    fast = load_profile(str(BENCHMARKS / "profiles" / "cpu-lr-3e-4.json"))
    assert make_ipd_config(cpu, 0).transformer.learning_rate == 3e-4
    assert TransformerNetConfig().learning_rate == 1e-4  # the library default stays DT's (DESIGN)
    assert fast.dt_learning_rate == 3e-4 and cpu.dt_learning_rate == 1e-4
    assert make_ipd_config(fast, 0).transformer == make_ipd_config(cpu, 0).transformer
    assert dataclasses.replace(fast, name=cpu.name, dt_learning_rate=1e-4) == cpu
    ds = "d4rlstyle/hopper/medium-replay-v0"
    assert _prefit_key(stage_config(fast, 0), ds) == _prefit_key(stage_config(cpu, 0), ds)
    assert _baseline("dt", fast, "cpu:0").config.learning_rate == 3e-4
    assert _baseline("dt", cpu, "cpu:0").config.learning_rate == 1e-4


def test_the_fp32_profile_differs_from_cpu_only_in_precision_and_reuses_its_stages():
    """benchmarks/profiles/cpu-fp32.json turns off bf16 in the transformer's training and the planner's candidate
    scoring, so a machine with native bf16 (AMX) trains as a machine without it does: rows made under it compare
    across CPUs. Nothing else differs, and stages 1-2 (trained in fp32 under both) share the cache."""
    import dataclasses

    from ipd_agent.bench import _prefit_key, load_profile, make_ipd_config, stage_config

    cpu = load_profile("cpu")
    fp32 = load_profile(str(BENCHMARKS / "profiles" / "cpu-fp32.json"))
    a, b = make_ipd_config(cpu, 0), make_ipd_config(fp32, 0)
    assert a.transformer.bf16 and a.planner.bf16  # the CPU profile keeps bf16 where the CPU has it
    assert not b.transformer.bf16 and not b.planner.bf16
    assert dataclasses.replace(b.transformer, bf16=True) == a.transformer
    assert dataclasses.replace(b.planner, bf16=True) == a.planner
    assert (b.value, b.world_model, b.augment) == (a.value, a.world_model, a.augment)
    ipd_part = {**fp32.ipd, "planner": {k: v for k, v in fp32.ipd["planner"].items() if k != "bf16"},
                "transformer": {k: v for k, v in fp32.ipd["transformer"].items() if k != "bf16"}}
    assert dataclasses.replace(fp32, name=cpu.name, ipd=ipd_part) == cpu
    ds = "d4rlstyle/hopper/full-replay-v0"
    assert _prefit_key(stage_config(fp32, 0), ds) == _prefit_key(stage_config(cpu, 0), ds)


def test_the_curve10_profile_differs_from_cpu_only_in_its_curve_episodes():
    """benchmarks/profiles/cpu-curve10.json (the early-stop diagnostic) evaluates every learning-curve point with 10
    episodes, as many as the final evaluation, and trains exactly as the CPU profile does."""
    import dataclasses

    from ipd_agent.bench import load_profile, make_ipd_config

    cpu = load_profile("cpu")
    curve10 = load_profile(str(BENCHMARKS / "profiles" / "cpu-curve10.json"))
    assert curve10.curve_episodes == curve10.eval_episodes == 10 and cpu.curve_episodes == 3
    assert dataclasses.replace(curve10, name=cpu.name, curve_episodes=cpu.curve_episodes) == cpu
    assert make_ipd_config(curve10, 7) == make_ipd_config(cpu, 7)


def test_the_previous_rate_diagnostic_restores_1e_4():
    """`--ablations lr-1e-4` re-makes rows like the table's `ipd` rows before the switch: only the rate differs."""
    import dataclasses

    from ipd_agent.bench import load_profile, make_ipd_config

    cpu = load_profile("cpu")
    old = make_ipd_config(cpu, 0, _benchmark_script("head_to_head").VARIANTS["lr-1e-4"]).transformer
    assert old.learning_rate == 1e-4
    assert dataclasses.replace(old, learning_rate=3e-4) == make_ipd_config(cpu, 0).transformer


@pytest.mark.parametrize("tag, field, value, profile_value", [("lr-cosine", "lr_schedule", "cosine", "constant"),
                                                              ("ema-0.9995", "ema_decay", 0.9995, 0.999)])
def test_transformer_diagnostics_change_one_setting_and_reuse_the_stages(tag, field, value, profile_value):
    """`--ablations lr-cosine` / `ema-0.9995` differ from the profile's `ipd` in one transformer setting alone, on the
    same cached stages 1-2, so their rows pair with the table's `ipd` rows (benchmarks/paired.py)."""
    import dataclasses

    from ipd_agent.bench import _prefit_key, load_profile, make_ipd_config, stage_config

    cpu, ds = load_profile("cpu"), "d4rlstyle/hopper/full-replay-v0"
    overrides = _benchmark_script("head_to_head").VARIANTS[tag]
    got = make_ipd_config(cpu, 0, overrides)
    assert getattr(got.transformer, field) == value and got.transformer.n_steps == cpu.transformer_steps
    assert dataclasses.replace(got.transformer, **{field: profile_value}) == make_ipd_config(cpu, 0).transformer
    assert _prefit_key(stage_config(cpu, 0, overrides), ds) == _prefit_key(stage_config(cpu, 0), ds)


def test_planner_variants_share_the_stages_of_ipd():
    """Variants that only change how imagined data are made (the MPPI output, greedy rollouts) reuse ipd's cached value
    function and world model, so their rows compare with ipd's on the same stages 1-2."""
    from ipd_agent.bench import _prefit_key, load_profile, make_ipd_config, stage_config

    cpu, ds = load_profile("cpu"), "d4rlstyle/halfcheetah/full-replay-v0"
    for overrides in ({"planner": {"execute": "mean"}}, {"planner": {"greedy": True}}):
        assert make_ipd_config(cpu, 0, overrides).planner != make_ipd_config(cpu, 0).planner
        assert _prefit_key(stage_config(cpu, 0, overrides), ds) == _prefit_key(stage_config(cpu, 0), ds)


def _put_score_row(folder: pathlib.Path, dataset: str, algo: str, seed: int, score: float) -> None:
    """A minimal result row (label, dataset, seed, score) where the harness would write it."""
    d = folder / "runs" / dataset.replace("/", "__")
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{algo}_seed{seed}.json").write_text(json.dumps(
        {"algo": algo, "dataset": dataset, "seed": seed, "normalized_score": score}))


def test_pooled_seeds_tables_every_seed_once(tmp_path):
    """benchmarks/pooled_seeds.py: seeds from two folders pooled; a seed present in both is refused, not counted twice."""
    mod = _benchmark_script("pooled_seeds")
    ds = "d4rlstyle/hopper/medium-replay-v0"

    def put(folder, algo, seed, score):
        _put_score_row(tmp_path / folder, ds, algo, seed, score)

    put("a", "dt", 0, 10.0)
    put("a", "dt", 1, 20.0)
    put("b", "dt", 3, 30.0)
    put("b", "bc", 3, 99.0)  # another label: not asked for, not shown
    table = mod.pooled_table([str(tmp_path / "a"), str(tmp_path / "b")], ["dt"], [ds])
    assert "| hopper/medium-replay | dt | 0,1,3 | 20.0 ± 8.2 | 10.0 / 20.0 / 30.0 |" in table
    assert "bc" not in table
    assert sorted(r["seed"] for r in mod.pooled_rows([str(tmp_path / "a"), str(tmp_path / "b")], ["dt"], [ds])) == [0, 1, 3]
    assert "mean over" not in table  # one set: no mean line
    ds2 = "d4rlstyle/hopper/full-replay-v0"
    d = tmp_path / "a" / "runs" / ds2.replace("/", "__")
    d.mkdir(parents=True)
    (d / "dt_seed0.json").write_text(json.dumps({"algo": "dt", "dataset": ds2, "seed": 0, "normalized_score": 40.0}))
    table = mod.pooled_table([str(tmp_path / "a"), str(tmp_path / "b")], ["dt", "bc"], [ds, ds2])
    assert "| **mean over 2 sets** | dt | per set | 30.0 | |" in table  # (20.0 + 40.0) / 2, per-set means
    assert "| **mean over 2 sets** | bc |" not in table  # bc has no full-replay row
    put("b", "dt", 1, 25.0)
    with pytest.raises(SystemExit, match="more than one folder"):
        mod.pooled_table([str(tmp_path / "a"), str(tmp_path / "b")], ["dt"], [ds])


def test_pooled_seeds_pools_two_names_of_one_deployment_and_pairs_two_labels(tmp_path):
    """--alias pools rows that name the same deployment differently in two folders; with two labels a second table
    gives the seed-by-seed difference over the seeds both have, with its standard error."""
    mod = _benchmark_script("pooled_seeds")
    ds = "d4rlstyle/hopper/full-replay-v0"

    def put(folder, algo, seed, score):
        _put_score_row(tmp_path / folder, ds, algo, seed, score)

    put("wa", "ipd-avg-capped-0.999", 0, 50.0)
    put("wa", "ipd-avg-bc-0.9995", 0, 1.0)  # another deployment of the same run: not pooled
    put("es", "ipd", 1, 70.0)
    put("es", "ipd", 2, 90.0)  # no dt for seed 2: in ipd's mean, not in the pairs
    put("dt", "dt", 0, 40.0)
    put("dt", "dt", 1, 80.0)
    folders = [str(tmp_path / f) for f in ("wa", "es", "dt")]
    rows = mod.pooled_rows(folders, ["ipd", "dt"], [ds], {"ipd-avg-capped-0.999": "ipd"})
    assert sorted((r["algo"], r["seed"], r.get("label_as_run")) for r in rows) == [
        ("dt", 0, None), ("dt", 1, None), ("ipd", 0, "ipd-avg-capped-0.999"), ("ipd", 1, None), ("ipd", 2, None)]
    table = mod.pooled_table(folders, ["ipd", "dt"], [ds], rows)
    assert "| hopper/full-replay | ipd | 0,1,2 | 70.0 ± 16.3 | 50.0 / 70.0 / 90.0 |" in table
    # differences +10 and -10: mean 0, SE = std(ddof=1) / sqrt(2) = 14.14 / 1.414 = 10.0
    assert "| hopper/full-replay | 0,1 | 60.0 | 60.0 | +0.0 ± 10.0 (n = 2) |" in table
    only = mod.pooled_rows(folders, ["ipd", "dt"], [ds], {"ipd-avg-capped-0.999": "ipd"}, seeds=[0])
    assert sorted((r["algo"], r["seed"]) for r in only) == [("dt", 0), ("ipd", 0)]
    # the same seed under both names is still refused, not counted twice
    put("es", "ipd", 0, 55.0)
    with pytest.raises(SystemExit, match="more than one folder"):
        mod.pooled_rows(folders, ["ipd", "dt"], [ds], {"ipd-avg-capped-0.999": "ipd"})


def test_curve_at_step_pairs_a_curve_point_with_the_same_episodes_of_the_final_evaluation(tmp_path):
    """benchmarks/curve_at_step.py: the step's point (curve_episodes episodes) is paired with the mean of the final
    evaluation's first curve_episodes returns, which start from the same seeded resets."""
    from ipd_agent.data import normalized_score, reference_scores

    mod = _benchmark_script("curve_at_step")
    ds = "d4rlstyle/hopper/full-replay-v0"
    ref = reference_scores({}, "Hopper-v5")
    d = tmp_path / "f" / "runs" / ds.replace("/", "__")
    d.mkdir(parents=True)
    for seed, at, returns in ((0, 90.0, [1000.0, 2000.0, 3000.0] + [0.0] * 7), (1, 20.0, [3000.0] * 10)):
        (d / f"ipd_seed{seed}.json").write_text(json.dumps({
            "algo": "ipd", "dataset": ds, "env_id": "Hopper-v5", "seed": seed, "gradient_steps": 5000,
            "profile": {"curve_episodes": 3}, "returns": returns, "return_mean": float(np.mean(returns)),
            "normalized_score": normalized_score(float(np.mean(returns)), ref),
            "learning_curve": [{"step": 3000, "normalized_score": at}, {"step": 5000, "normalized_score": 0.0}]}))
    rows = mod.pooled_rows([str(tmp_path / "f")], ["ipd"], [ds])
    pairs = mod.step_pairs(rows, 3000)[(ds, "ipd")]
    same0 = normalized_score(2000.0, ref)  # mean of the first three returns only
    assert [(s, a, round(b, 6), k) for s, a, b, _, k in pairs] == [(0, 90.0, round(same0, 6), 3),
                                                                    (1, 20.0, round(normalized_score(3000.0, ref), 6), 3)]
    assert mod.step_pairs(rows, 5000) == {}  # the final evaluation is not a curve point to compare with itself
    table = mod.step_table(mod.step_pairs(rows, 3000), [ds], ["ipd"], 3000)
    diff = [90.0 - same0, 20.0 - normalized_score(3000.0, ref)]
    assert f"{np.mean(diff):+.1f} ± {np.std(diff, ddof=1) / np.sqrt(2):.1f} | {np.mean(np.abs(diff)):.1f} |" in table
    # a second label is read on its own, never pooled into the first
    row = json.loads((d / "ipd_seed1.json").read_text())
    (d / "dt_seed1.json").write_text(json.dumps({**row, "algo": "dt"}))
    both = mod.step_pairs(mod.pooled_rows([str(tmp_path / "f")], ["ipd", "dt"], [ds]), 3000)
    assert [p[0] for p in both[(ds, "ipd")]] == [0, 1] and [p[0] for p in both[(ds, "dt")]] == [1]


def test_curve_table_means_each_step_share_per_label():
    """benchmarks/head_to_head.py's learning-curve section: scores at the same share of each run's budget are averaged
    per (dataset, label); runs with different step budgets line up by share, not by step."""
    mod = _benchmark_script("head_to_head")
    ds = "d4rlstyle/halfcheetah/full-replay-v0"

    def row(algo, steps, scores):
        marks = [steps * (i + 1) // len(scores) for i in range(len(scores))]
        return {"dataset": ds, "algo": algo, "gradient_steps": steps,
                "learning_curve": [{"step": m, "normalized_score": s} for m, s in zip(marks, scores)]}

    rows = [row("dt", 10, [10.0, 30.0]), row("dt", 10, [20.0, 50.0]), row("ipd", 40, [1.0, 2.0])]
    lines = mod.curve_table(rows).splitlines()
    assert lines[0] == "| dataset | label | n | 50 % | 100 % |"
    assert lines[2] == "| halfcheetah/full-replay | ipd | 1 | 1.0 | 2.0 |"  # IPD first, as in the main table
    assert lines[3] == "| halfcheetah/full-replay | dt | 2 | 15.0 | 40.0 |"
    assert mod.curve_table([]) == ""


def test_readme_main_table_is_the_committed_rows(tmp_path):
    """The README's main table is what `head_to_head.py --report-only --readme README.md` writes from the committed
    rows: a row added without refreshing the README (or a hand edit of the table) fails here."""
    from ipd_agent.bench import load_profile

    mod = _benchmark_script("head_to_head")
    repo = BENCHMARKS.parent
    rows = mod.load_rows(str(BENCHMARKS / "results" / "head_to_head"))
    assert {r["algo"] for r in rows} >= set(mod.ALGOS)
    block = mod.readme_block(rows, load_profile("cpu"))
    readme = (repo / "README.md").read_text()
    assert block in readme, "README main table is stale: run python benchmarks/head_to_head.py --report-only --readme README.md"
    # and the rewrite replaces exactly the marked block
    copy = tmp_path / "README.md"
    copy.write_text(readme.replace("| **mean over 6** |", "| **mean over six** |", 1))
    mod.update_readme(str(copy), block)
    assert copy.read_text() == readme


def test_model_select_floor_imagines_each_start_state_as_if_it_were_alone(loaded_copy, fitted):
    """benchmarks/model_select_floor.py rolls the deployed policy out in its world model for a batch of start states:
    with the elites' mean dynamics the batch must give each start what a rollout from it alone gives, including where
    a rollout stops at a predicted terminal."""
    mod = _benchmark_script("model_select_floor")
    starts = fitted.traj.observations[fitted.traj.episode_starts[:4]]
    batch = mod.imagine(loaded_copy, starts, horizon=25, sample=False, seed=0)
    alone = [mod.imagine(loaded_copy, starts[i:i + 1], horizon=25, sample=False, seed=0) for i in range(4)]
    assert batch["return"] == pytest.approx(np.mean([a["return"] for a in alone]), rel=1e-4, abs=1e-4)
    assert batch["length"] == pytest.approx(np.mean([a["length"] for a in alone]))
    lengths = [a["length"] for a in alone]
    assert min(lengths) >= 1 and max(lengths) <= 25
    assert min(lengths) < 25  # random-policy hopper data: some rollout stops at a predicted fall before the horizon
    assert np.isfinite([batch["return"], batch["return_trusted"]]).all()


def test_rename_rows_relabels_with_provenance_and_never_overwrites(tmp_path):
    """benchmarks/rename_rows.py: a row keeps what it measured, gets its new label in file name and `algo`, and says
    where it came from; seeds filter; a clash or a mislabelled row stops it before anything moves."""
    mod = _benchmark_script("rename_rows")
    src, dst = tmp_path / "a", tmp_path / "b"
    ds = src / "runs" / "d4rlstyle__hopper__medium-v0"
    ds.mkdir(parents=True)
    for seed in (0, 1, 3):
        (ds / f"ipd-lr-3e-4_seed{seed}.json").write_text(json.dumps({
            "algo": "ipd-lr-3e-4", "dataset": "d4rlstyle/hopper/medium-v0", "seed": seed,
            "normalized_score": 10.0 + seed}))
    (ds / "ipd-lr-3e-4x_seed0.json").write_text(json.dumps({"algo": "ipd-lr-3e-4x"}))  # another label: untouched
    out = mod.rename_rows(str(src), "ipd-lr-3e-4", "ipd", "the profile's rate now", dst=str(dst), copy=True,
                          seeds=[0, 1])
    assert [os.path.basename(p) for p in out] == ["ipd_seed0.json", "ipd_seed1.json"]
    row = json.loads((dst / "runs" / ds.name / "ipd_seed1.json").read_text())
    assert row["algo"] == "ipd" and row["normalized_score"] == 11.0 and row["seed"] == 1
    assert row["renamed_from"] == [{"label": "ipd-lr-3e-4", "folder": "a", "why": "the profile's rate now"}]
    assert (ds / "ipd-lr-3e-4_seed0.json").exists()  # copied, not moved
    with pytest.raises(SystemExit, match="exists"):  # seed 0 is already there: nothing moves, seed 3 included
        mod.rename_rows(str(src), "ipd-lr-3e-4", "ipd", "again", dst=str(dst))
    assert (ds / "ipd-lr-3e-4_seed3.json").exists() and not (dst / "runs" / ds.name / "ipd_seed3.json").exists()
    (ds / "ipd-lr-3e-4_seed3.json").write_text(json.dumps({"algo": "dt", "dataset": "d4rlstyle/hopper/medium-v0",
                                                           "seed": 3}))
    with pytest.raises(SystemExit, match="labelled 'dt'"):
        mod.rename_rows(str(src), "ipd-lr-3e-4", "old", "moved", seeds=[0, 3])
    assert (ds / "ipd-lr-3e-4_seed0.json").exists() and not (ds / "old_seed0.json").exists()
    moved = mod.rename_rows(str(src), "ipd-lr-3e-4", "old", "moved", seeds=[1])
    assert not (ds / "ipd-lr-3e-4_seed1.json").exists() and os.path.exists(moved[0])
    with pytest.raises(SystemExit, match="no rows"):
        mod.rename_rows(str(src), "nothing", "x", "y")


def test_paired_compares_only_same_stage_pairs(tmp_path):
    """benchmarks/paired.py: a variant and its control pair up by (dataset, seed); a seed filter applies; a pair on
    different stages 1-2 is refused rather than averaged."""
    mod = _benchmark_script("paired")
    ds = tmp_path / "runs" / "d4rlstyle__hopper__medium-v0"
    ds.mkdir(parents=True)

    def row(label, seed, score, imagined=100, threshold=2.5):
        (ds / f"{label}_seed{seed}.json").write_text(json.dumps({
            "algo": label, "dataset": "d4rlstyle/hopper/medium-v0", "seed": seed, "normalized_score": score,
            "returns": [score * 10, score * 20],
            "learning_curve": [{"step": 50, "normalized_score": score / 2}, {"step": 100, "normalized_score": score}],
            "augmentation": {"imagined_transitions": imagined, "threshold": threshold}}))

    row("ipd", 0, 10.0), row("ipd-x", 0, 20.0), row("ipd", 1, 30.0), row("ipd-x", 1, 10.0), row("ipd-x", 2, 99.0)
    pairs = mod.paired_rows(str(tmp_path), "ipd-x")  # seed 2 has no control
    assert [(p["seed"], p["variant"], p["control"]) for p in pairs] == [(0, 20.0, 10.0), (1, 10.0, 30.0)]
    assert "| **mean over 2 pairs** | | 15.0 | 20.0 |" in mod.report(pairs, "ipd-x", "ipd")
    assert [p["seed"] for p in mod.paired_rows(str(tmp_path), "ipd-x", seeds=[1])] == [1]
    # spread: std over seeds (population, as the table) and the mean move over the last checkpoint, per label
    assert "| hopper/medium | 5.0 | 7.5 | 10.0 | 10.0 |" in mod.spread_report(pairs, "ipd-x", "ipd")
    assert "identical in 0 of 2 pairs" in mod.report(pairs, "ipd-x", "ipd")
    other = tmp_path / "other" / "runs" / ds.name  # the control re-made elsewhere, same returns
    other.mkdir(parents=True)
    (other / "ipd_seed0.json").write_text((ds / "ipd-x_seed0.json").read_text())
    again = mod.paired_rows(str(tmp_path), "ipd-x", control_folder=str(tmp_path / "other"))
    assert [(p["seed"], p["same_returns"]) for p in again] == [(0, True)]
    assert "identical in 1 of 1 pairs" in mod.report(again, "ipd-x", "ipd")
    row("ipd", 2, 5.0, threshold=2.6)
    with pytest.raises(SystemExit, match="different stages"):
        mod.paired_rows(str(tmp_path), "ipd-x")


def test_weight_averages_deploy_several_averages_of_the_harness_own_training_run(hopper_episodes, tmp_path):
    """benchmarks/weight_averages.py: one fit, one row per deployment. Its control row (the profile's own average) repeats
    the harness's `ipd` row episode for episode, so the other rows differ from it only by how the same iterates are
    averaged."""
    import dataclasses

    from ipd_agent.bench import run_one

    mod = _benchmark_script("weight_averages")
    root = tmp_path / "datasets"
    write_minari(root, "ipdtest/hopper-random-v0", "Hopper-v5", hopper_episodes[:40])
    prof = dataclasses.replace(PROFILE, ipd={**PROFILE.ipd, "transformer": {"ema_decay": 0.999}})
    out = str(tmp_path / "results")
    rows = {r["algo"]: r for r in mod.run("ipdtest/hopper-random-v0", 0, out, prof, (0.9, 0.95), str(root))}
    assert list(rows) == mod.labels((0.9, 0.95)) == ["ipd-avg-capped-0.999", "ipd-avg-bc-0.9", "ipd-avg-bc-0.95",
                                                     "ipd-avg-last-iterate"]
    table = run_one("ipd", "ipdtest/hopper-random-v0", 0, prof, out, dataset_root=str(root))  # same stage cache
    control = rows["ipd-avg-capped-0.999"]
    assert control["returns"] == table["returns"] and control["learning_curve"] == table["learning_curve"]
    assert len({tuple(r["returns"]) for r in rows.values()}) > 1  # other weights, other episodes
    for name, r in rows.items():
        assert len(r["returns"]) == prof.eval_episodes and r["learning_curve"][-1]["normalized_score"] == \
            r["normalized_score"], name
        assert r["augmentation"] == table["augmentation"]  # one training run, the table's stages
    assert rows["ipd-avg-bc-0.9"]["config"]["transformer"]["ema_warmup"] == "bias_corrected"
    assert rows["ipd-avg-bc-0.95"]["config"]["transformer"]["ema_decay"] == 0.95
    assert rows["ipd-avg-last-iterate"]["config"]["transformer"]["ema_decay"] == 0.0
    t0 = time.perf_counter()
    assert mod.run("ipdtest/hopper-random-v0", 0, out, prof, (0.9, 0.95), str(root)) == list(rows.values())
    assert time.perf_counter() - t0 < 5  # finished: read back, not refitted


def test_select_deployment_scores_candidates_of_one_training_run(hopper_episodes, tmp_path):
    """benchmarks/select_deployment.py: one fit keeps several candidate weights; each is evaluated and scored offline.
    Its control (the weights fit returns) repeats the harness's `ipd` row episode for episode, the criteria are the
    same when scored twice (common random numbers), and a criterion's pick and paired gain follow from the row."""
    from ipd_agent.bench import run_one

    mod = _benchmark_script("select_deployment")
    root = tmp_path / "datasets"
    write_minari(root, "ipdtest/hopper-random-v0", "Hopper-v5", hopper_episodes[:40])
    prof = dataclasses.replace(PROFILE, ipd={**PROFILE.ipd, "transformer": {"ema_decay": 0.999}})
    out = str(tmp_path / "results")
    row = mod.run("ipdtest/hopper-random-v0", 0, out, prof, str(root), n_starts=8, horizon=30, value_horizon=10,
                  n_windows=64)
    assert mod.candidate_steps(40) == [24, 28, 32, 36]
    assert list(row["candidates"]) == ["step-24", "step-28", "step-32", "step-36", "final", "bc-0.9995"]
    table = run_one("ipd", "ipdtest/hopper-random-v0", 0, prof, out, dataset_root=str(root))  # same stage cache
    assert row["candidates"]["final"]["returns"] == table["returns"]
    assert row["augmentation"] == table["augmentation"]
    for c in row["candidates"].values():
        assert len(c["returns"]) == prof.eval_episodes
        assert np.isfinite([c[k] for k in mod.CRITERIA]).all() and 1 <= c["wm_length"] <= 30
    assert len({c["q_data"] for c in row["candidates"].values()}) > 1  # other weights, other actions
    # the criteria are deterministic: the final weights scored again give the same numbers
    from ipd_agent import load_ipd
    from ipd_agent.data import load_minari

    os.environ["MINARI_DATASETS_PATH"] = str(root)
    traj, _ = load_minari("ipdtest/hopper-random-v0")
    algo = load_ipd(os.path.join(out, "models", "ipdtest__hopper-random-v0", "ipd_seed0.d3"))
    again = mod.offline_scores(algo, mod.start_states(traj, 8, 0), mod.data_windows(traj, 5, 64, 0), 30, 10, 0)
    for k in mod.CRITERIA:
        assert again[k] == pytest.approx(row["candidates"]["final"][k], rel=1e-4, abs=1e-4), k
    # picks and gains from a hand-made row
    fake = {"dataset": "d/hopper/x", "seed": 0, "control": "final", "candidates": {
        "step-3": {"normalized_score": 50.0, "wm_return": 9.0, "wm_value": 1.0, "q_data": 0.0},
        "final": {"normalized_score": 20.0, "wm_return": 1.0, "wm_value": 2.0, "q_data": 0.0}}}
    assert mod.pick(fake, "wm_return") == "step-3" and mod.pick(fake, "wm_value") == "final"
    s = mod.summarise([fake])
    assert s["wm_return"]["gains"] == [30.0] and s["wm_value"]["gains"] == [0.0] and s["oracle"]["mean"] == 30.0
    assert "| hopper/x | 0 | 20.0 | 50.0 (step-3) | 20.0 (final) |" in mod.report([fake])
    assert mod.run("ipdtest/hopper-random-v0", 0, out, prof, str(root)) == row  # finished: read back


def test_median_of_identical_policies_is_the_policy(fitted):
    """benchmarks/deploy_together.py: the median of several copies of one policy's weights acts exactly as that policy
    (the executed action, written back into each context, is its own), on a real Hopper-v5 episode."""
    import gymnasium as gym

    mod = _benchmark_script("deploy_together")
    algo = fitted.algo
    weights = [p.detach().clone() for p in algo.impl.transformer.parameters()]
    together, alone = mod.MedianOfPolicies(algo, [weights] * 3), algo.as_stateful_wrapper()
    env = gym.make("Hopper-v5", max_episode_steps=60)
    n = acts_alike(together, alone, env, seed=3)
    assert n > algo.config.context_size  # the windows filled and rolled
    # the median follows the majority: one set outvoted by two copies of another acts as that other set alone
    other = [w + 0.05 * torch.randn_like(w) for w in weights]
    mixed, other_alone = mod.MedianOfPolicies(algo, [weights, other, other]), mod.MedianOfPolicies(algo, [other])
    for policy in (mixed, other_alone, together):
        policy.reset()
    o, _ = env.reset(seed=3)
    a = mixed.predict(o, 0.0)
    np.testing.assert_array_equal(a, other_alone.predict(o, 0.0))
    assert not np.array_equal(a, together.predict(o, 0.0))


def test_seed_ensemble_member_reseeds_stage_six_only(fitted):
    """benchmarks/seed_ensemble.py: a member is the fitted model with only stage 6 trained afresh under its own seed
    (stages 1-5 shared, the fitted model untouched, the member reproducible), and the median deployment of a majority of
    identical members acts as that member alone on a real Hopper-v5 episode."""
    import gymnasium as gym

    from ipd_agent.policy import TransformerContext

    mod = _benchmark_script("seed_ensemble")
    algo = fitted.algo
    before = [p.detach().clone() for p in algo.impl.transformer.parameters()]
    member, _ = mod.train_member(algo, 1, 30)
    again, _ = mod.train_member(algo, 1, 30)
    assert member.config.seed == algo.config.seed + mod.SEED_STRIDE
    assert all(torch.equal(p, b) for p, b in zip(algo.impl.transformer.parameters(), before))
    for name in ("value", "world_model"):  # stages 1-2 and the augmented data are the run's own
        mine, theirs = getattr(member.impl, name).state_dict(), getattr(algo.impl, name).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    np.testing.assert_array_equal(member.augmentation.trajectories.actions, algo.augmentation.trajectories.actions)
    assert int(member.impl.stages.transformer_steps) == 30
    assert not all(torch.equal(p, q) for p, q in zip(member.impl.transformer.parameters(), before))
    assert all(torch.equal(p, q) for p, q in zip(member.impl.transformer.parameters(),
                                                 again.impl.transformer.parameters()))
    together = mod.MedianOfPolicies(contexts=[TransformerContext(a, 1) for a in (algo, member, again)])
    alone = member.as_stateful_wrapper()
    acts_alike(together, alone, gym.make("Hopper-v5", max_episode_steps=20), seed=5)
    # the report's arithmetic, from a hand-made row
    row = {"dataset": "d/hopper/x", "seed": 0, "results": {
        "member-0": {"normalized_score": 50.0}, "member-1": {"normalized_score": 30.0},
        "member-2": {"normalized_score": 10.0}, "median": {"normalized_score": 40.0}}}
    assert "| hopper/x | 0 | 50.0, 30.0, 10.0 | 30.0 | 40.0 | +10.0 | -10.0 |" in mod.report([row])


def test_median_of_dt_members_records_the_executed_action(hopper_traj):
    """benchmarks/seed_ensemble.py --algo dt: the median of three copies of one trained DecisionTransformer acts as
    that DT alone on a real Hopper-v5 episode, and every member's context holds the executed action, its own when
    outvoted."""
    import d3rlpy
    import gymnasium as gym

    from ipd_agent.bench import _baseline, load_profile

    mod = _benchmark_script("seed_ensemble")
    d3rlpy.seed(0)
    dt = _baseline("dt", load_profile("tiny"), "cpu:0")
    dt.fit(hopper_traj.to_d3rlpy(), n_steps=20, n_steps_per_epoch=20, show_progress=False,
           logger_adapter=d3rlpy.logging.NoopAdapterFactory())
    together = mod.MedianOfDT([dt.as_stateful_wrapper(3600.0) for _ in range(3)])
    alone = dt.as_stateful_wrapper(3600.0)
    env = gym.make("Hopper-v5", max_episode_steps=15)

    def recorded(a):  # every member's context holds the executed action
        for w in together.wrappers:
            np.testing.assert_array_equal(w._actions[-2], a)

    acts_alike(together, alone, env, seed=2, check=recorded)
    # outvoted: the first member's context holds the majority's action, not the one it proposed
    d3rlpy.seed(1)
    other = _baseline("dt", load_profile("tiny"), "cpu:0")
    other.fit(hopper_traj.to_d3rlpy(), n_steps=20, n_steps_per_epoch=20, show_progress=False,
              logger_adapter=d3rlpy.logging.NoopAdapterFactory())
    mixed = mod.MedianOfDT([dt.as_stateful_wrapper(3600.0)] + [other.as_stateful_wrapper(3600.0) for _ in range(2)])
    own = dt.as_stateful_wrapper(3600.0)
    o, _ = env.reset(seed=2)
    a = mixed.predict(o, 0.0)
    proposed = own.predict(o, 0.0)
    assert not np.array_equal(a, proposed)
    np.testing.assert_array_equal(mixed.wrappers[0]._actions[-2], a)


@pytest.mark.parametrize("dt_median_fr", [60.0, 90.0])
def test_seed_ensemble_beside_the_table_reads_both_bars(monkeypatch, tmp_path, dt_median_fr):
    """benchmarks/seed_ensemble.py --report --table: the bar against the table (six-set mean, replay sets against the
    table's DT) and the same-multiple line against DT's own median, which names a set where IPD's median is not higher
    and the replay sets DT's median did not reach three seeds on."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    mod = _benchmark_script("seed_ensemble")
    from head_to_head import DATASETS

    def ens(ds, seed, median, first):
        return {"dataset": ds, "seed": seed, "results": {"median": {"normalized_score": median},
                                                          "member-0": {"normalized_score": first}}}

    fr = "d4rlstyle/hopper/full-replay-v0"
    rows = [ens(ds, s, 80.0, 50.0) for ds in DATASETS for s in (0, 1, 2)]
    table = [{"dataset": ds, "algo": a, "seed": s, "normalized_score": score} for ds in DATASETS for s in (0, 1, 2)
             for a, score in (("ipd", 50.0), ("dt", 85.0 if ds == fr else 40.0), ("iql", 30.0), ("cql", 20.0),
                              ("td3bc", 30.0), ("bc", 25.0))]
    dt_rows = [ens(fr, s, dt_median_fr, 0.0) for s in (0, 1, 2)] + [ens("d4rlstyle/hopper/medium-replay-v0", 0, 1, 0)]
    text = mod.beside_the_table(rows, table, dt_rows, plot=str(tmp_path / "beside.png"))
    assert (tmp_path / "beside.png").stat().st_size > 0 and "![beside the table](beside.png)" in text
    assert "median of 3 **80.0**" in text
    assert "above the table's DT on every replay set: no (hopper/full-replay)." in text  # 80 against the table's 85
    verdict = "higher" if dt_median_fr < 80 else "not higher"
    assert f"hopper/full-replay 80.0 against {dt_median_fr:.1f} ({verdict})." in text
    # one seed of DT's median on medium-replay is not a comparison
    assert "Not run to three seeds: hopper/medium-replay, halfcheetah/medium-replay, halfcheetah/full-replay." in text


def test_seed_ensemble_beside_the_table_reads_the_replay_sets_alone(monkeypatch, tmp_path):
    """With every replay set run to seeds 0-2 but not the two medium sets, --report --table reads the bar's replay-set
    parts (plot included) and gives no six-set mean; with a replay set short of a seed, neither."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    mod = _benchmark_script("seed_ensemble")
    from head_to_head import DATASETS

    def ens(ds, seed, median):
        return {"dataset": ds, "seed": seed, "results": {"median": {"normalized_score": median},
                                                          "member-0": {"normalized_score": 50.0}}}

    fr, replay = "d4rlstyle/hopper/full-replay-v0", [ds for ds in DATASETS if "replay" in ds]
    assert len(replay) == 4
    table = [{"dataset": ds, "algo": a, "seed": s, "normalized_score": score} for ds in DATASETS for s in (0, 1, 2)
             for a, score in (("ipd", 50.0), ("dt", 40.0), ("iql", 30.0), ("cql", 20.0), ("td3bc", 30.0), ("bc", 25.0))]
    dt_rows = [ens(fr, s, 60.0) for s in (0, 1, 2)]
    rows = [ens(ds, s, 45.0 if ds == fr else 80.0) for ds in replay for s in (0, 1, 2)]
    text = mod.beside_the_table(rows, table, dt_rows, plot=str(tmp_path / "beside.png"))
    assert "Sets with all of seeds [0, 1, 2]: 4 of 6." in text and "Mean over the six sets" not in text
    assert (tmp_path / "beside.png").stat().st_size > 0
    assert "The bar on the replay sets (the six-set mean needs all six sets): above the table's DT on every replay " \
           "set: yes." in text  # 45 and 80 against DT's 40
    assert "hopper/full-replay 45.0 against 60.0 (not higher)." in text
    short_of_a_seed = [r for r in rows if not (r["dataset"] == fr and r["seed"] == 2)]
    text = mod.beside_the_table(short_of_a_seed, table, dt_rows, plot=str(tmp_path / "short.png"))
    assert "Sets with all of seeds [0, 1, 2]: 3 of 6." in text and "The bar" not in text
    assert not (tmp_path / "short.png").exists()


def test_a_row_names_its_commit_and_says_when_the_code_differs_from_it(tmp_path):
    """Rows record the commit of the code that ran; code edited since that commit is marked "+dirty" (a results or
    docs edit is not), so a table built from such rows does not claim a commit that cannot re-make them."""
    import subprocess

    from ipd_agent.bench import _git_commit

    def git(*args):
        return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    for rel in ("ipd_agent/algo.py", "benchmarks/head_to_head.py", "benchmarks/results/summary.md", "README.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "c")
    head = git("rev-parse", "--short", "HEAD")
    package = str(tmp_path / "ipd_agent")
    assert _git_commit(package) == head
    (tmp_path / "README.md").write_text("y\n")
    (tmp_path / "benchmarks/results/summary.md").write_text("y\n")
    assert _git_commit(package) == head  # results and docs do not change what a row's code was
    (tmp_path / "benchmarks/head_to_head.py").write_text("y\n")
    assert _git_commit(package) == head + "+dirty"
    git("checkout", "--", "benchmarks/head_to_head.py")
    (tmp_path / "ipd_agent/algo.py").write_text("y\n")
    assert _git_commit(package) == head + "+dirty"
