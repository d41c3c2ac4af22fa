"""Head-to-head benchmark harness: IPD and d3rlpy baselines on the same data, budget and evaluation.

Every run trains one algorithm on one Minari dataset with one seed, evaluates the *last* iterate
for ``eval_episodes`` episodes with d3rlpy's own environment evaluators, and writes one JSON row
(score, normalised score, wall time, budget, versions, exact config). Finished runs are skipped,
so a sweep can be stopped and resumed. Runs go to a process pool, one torch thread each.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Optional

import numpy as np

__all__ = ["Profile", "load_profile", "run_one", "run_sweep", "summarise", "markdown_table", "ALGOS"]

ALGOS = ("ipd", "dt", "iql", "cql", "td3bc", "bc")


@dataclasses.dataclass
class Profile:
    """A compute budget shared by every algorithm in a sweep."""

    name: str = "cpu"
    q_steps: int = 20_000  # gradient steps for CQL / IQL / TD3+BC / BC (and IPD's IQL stage)
    transformer_steps: int = 10_000  # gradient steps for DT and IPD's transformer
    transformer_hidden: int = 64  # embedding width of DT and IPD's transformer (same size for both)
    transformer_layers: int = 2  # blocks of DT and IPD's transformer
    dt_learning_rate: float = 1e-4  # DT's AdamW learning rate (d3rlpy's recipe; IPD's is in ``ipd``'s transformer)
    eval_episodes: int = 10  # evaluation episodes of the policy fit returns (last evaluation, no best-of selection)
    dt_target_return: dict = dataclasses.field(default_factory=lambda: {"Hopper": 3600.0, "HalfCheetah": 12000.0,
                                                                          "Walker2d": 5000.0})
    ipd: dict = dataclasses.field(default_factory=dict)  # IPDConfig overrides (nested dicts)
    threads: int = 1  # torch threads per run
    curve_points: int = 5  # learning-curve evaluations per run (the last one is the final evaluation)
    curve_episodes: int = 3  # episodes per intermediate learning-curve evaluation (cheaper than the final one)
    device: str = "cpu:0"  # torch device of every run: "cuda:0" on a GPU machine (the gpu profile's)

    def __post_init__(self) -> None:
        # a wrong type would otherwise surface deep inside a worker, after the sweep had started
        kinds = {"int": (int,), "float": (int, float), "str": (str,), "dict": (dict,)}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, kinds[f.type]):
                raise ValueError(f"profile field {f.name!r} must be {f.type}, got {value!r}")
        for name in ("q_steps", "transformer_steps", "transformer_hidden", "transformer_layers", "eval_episodes",
                     "threads", "curve_points", "curve_episodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"profile field {name!r} must be at least 1, got {getattr(self, name)}")
        if self.dt_learning_rate <= 0:
            raise ValueError(f"profile field 'dt_learning_rate' must be positive, got {self.dt_learning_rate}")


def load_profile(path_or_name: str) -> Profile:
    """A profile from a JSON file, or a built-in one: 'cpu', 'gpu' or 'tiny'."""
    here = os.path.join(os.path.dirname(__file__), "profiles", f"{path_or_name}.json")
    path = path_or_name if os.path.exists(path_or_name) else here
    if not os.path.exists(path):
        raise FileNotFoundError(f"No profile {path_or_name!r}: pass a JSON file or one of cpu, gpu, tiny.")
    with open(path) as f:
        try:
            fields = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"profile {path!r} is not valid JSON: {exc}") from exc
    if not isinstance(fields, dict):
        raise ValueError(f"profile {path!r} must hold a JSON object of Profile fields")
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(Profile)})
    if unknown:
        raise ValueError(f"profile {path!r}: unknown field(s) {unknown}; valid: "
                         f"{[f.name for f in dataclasses.fields(Profile)]}")
    return Profile(**fields)


def _git_commit(where: Optional[str] = None) -> Optional[str]:
    """The checkout's short commit, with "+dirty" when the code differs from it (the package, the benchmark scripts
    or their profiles; results and docs do not count): such a row cannot be re-made from the commit alone."""
    import subprocess

    where = where or os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=where, timeout=10).stdout.strip()
        if not out:
            return None
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             cwd=where, timeout=10).stdout.strip()
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "ipd_agent", "benchmarks/*.py",
                                  "benchmarks/profiles"], cwd=top, timeout=10).returncode
        return out + ("+dirty" if changed == 1 else "")
    except Exception:  # noqa: BLE001 - not a git checkout
        return None


_COMMIT_AT_IMPORT = _git_commit()  # the code that is running, even if the checkout moves on meanwhile


def versions() -> dict:
    import d3rlpy
    import gymnasium
    import minari
    import mujoco
    import torch

    from . import __version__
    from .config import native_cpu_bf16

    return {"ipd_agent": __version__, "git_commit": _COMMIT_AT_IMPORT, "d3rlpy": d3rlpy.__version__, "torch": torch.__version__,
            "gymnasium": gymnasium.__version__, "mujoco": mujoco.__version__, "minari": minari.__version__,
            "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
            # whether IPD's transformer trains under bf16 autocast here (TransformerNetConfig.bf16 applies only where
            # the CPU has native bf16): runs on machines that differ here differ in training precision
            "cpu_bf16": native_cpu_bf16(), "cpu": _cpu_signature()}


def _cpu_signature() -> str:
    """torch's kernel tier and the vector extensions that change which float kernels run. Stages fitted on CPUs that
    differ here can differ in the last bits (and, through the augmentation threshold, in every later number), so a
    re-run on another machine reproduces a row within seed noise, not to the last digit."""
    import torch

    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:  # not Linux: the kernel tier alone
        pass
    isa = [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if x in flags]
    return "+".join([torch.backends.cpu.get_cpu_capability()] + isa)


def make_ipd_config(profile: Profile, seed: int, overrides: Optional[dict] = None):
    from .algo import IPDConfig

    cfg: dict[str, Any] = {
        "seed": seed,
        "value": {"n_steps": profile.q_steps},
        "transformer": {"n_steps": profile.transformer_steps, "hidden_size": profile.transformer_hidden,
                        "n_layers": profile.transformer_layers},
    }
    for src in (profile.ipd, overrides or {}):
        for k, v in src.items():
            if isinstance(v, dict):
                cfg.setdefault(k, {}).update(v)
            else:
                cfg[k] = v
    return IPDConfig.from_settings(cfg)


def check_device(device: Optional[str]) -> None:
    """A CUDA device on a machine without one fails here, with the fix, not deep inside the first run."""
    if device and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU. Use --device "
                             "cpu:0 (or a cpu profile), or install a CUDA build of torch on a GPU machine.")


def start_ipd_run(profile: Profile, dataset_id: str, seed: int, dataset_root: Optional[str] = None):
    """How a one-off IPD run outside the sweep starts, in ``run_one``'s order (benchmarks/ diagnostics): one torch thread
    per process, the dataset (from ``dataset_root`` if given), its reference scores, d3rlpy seeded, then the run's config.
    Returns ``(traj, meta, ref, cfg)``."""
    import torch

    torch.set_num_threads(profile.threads)
    if dataset_root:
        os.environ["MINARI_DATASETS_PATH"] = dataset_root
    import d3rlpy

    from .data import load_minari, reference_scores

    traj, meta = load_minari(dataset_id)
    ref = reference_scores(meta)
    d3rlpy.seed(seed)
    return traj, meta, ref, make_ipd_config(profile, seed)


def _baseline(name: str, profile: Profile, device: str):
    import d3rlpy

    if name == "dt":
        return d3rlpy.algos.DecisionTransformerConfig(
            batch_size=64,
            learning_rate=profile.dt_learning_rate,
            optim_factory=d3rlpy.optimizers.AdamWFactory(
                weight_decay=1e-4, clip_grad_norm=0.25,
                lr_scheduler_factory=d3rlpy.optimizers.WarmupSchedulerFactory(warmup_steps=1000)),
            encoder_factory=d3rlpy.models.VectorEncoderFactory([profile.transformer_hidden],
                                                               exclude_last_activation=True),
            observation_scaler=d3rlpy.preprocessing.StandardObservationScaler(),
            reward_scaler=d3rlpy.preprocessing.MultiplyRewardScaler(0.001),
            position_encoding_type=d3rlpy.PositionEncodingType.GLOBAL,
            context_size=20, num_heads=1, num_layers=profile.transformer_layers, max_timestep=1000,
        ).create(device=device)
    if name == "iql":
        return d3rlpy.algos.IQLConfig(
            reward_scaler=d3rlpy.preprocessing.ReturnBasedRewardScaler(multiplier=1000.0)).create(device=device)
    if name == "cql":
        return d3rlpy.algos.CQLConfig().create(device=device)
    if name == "td3bc":
        return d3rlpy.algos.TD3PlusBCConfig(
            observation_scaler=d3rlpy.preprocessing.StandardObservationScaler()).create(device=device)
    if name == "bc":
        return d3rlpy.algos.BCConfig().create(device=device)
    raise ValueError(f"unknown algorithm {name!r}; choose from {ALGOS}")


def evaluate(algo: Any, env_id: Any, episodes: int, seed: int, transformer_target: Optional[float] = None,
             policy: Any = None) -> list:
    """Returns of ``episodes`` episodes with d3rlpy's evaluators (seeded env); ``env_id`` may be an EnvSpec.
    ``policy``: a stateful policy (``predict(x, reward)``, ``reset()``) to run instead of ``algo``'s own, on the same
    env seeds (diagnostics that deploy something other than the fitted model)."""
    import gymnasium as gym
    from d3rlpy.metrics import evaluate_qlearning_with_environment, evaluate_transformer_with_environment

    from .algo import IPD
    from .data import check_unit_box

    env = gym.make(env_id)
    if isinstance(env.action_space, gym.spaces.Box):
        check_unit_box(env.action_space, f"evaluation env {getattr(env_id, 'id', env_id)!r}")
    env.reset(seed=10_000 + seed)
    env.action_space.seed(seed)
    rets = []
    for _ in range(episodes):  # one episode per call so every return is recorded
        if policy is not None:
            rets.append(evaluate_transformer_with_environment(policy, env, n_trials=1))
        elif isinstance(algo, IPD):
            rets.append(evaluate_transformer_with_environment(algo.as_stateful_wrapper(), env, n_trials=1))
        elif transformer_target is not None:
            rets.append(evaluate_transformer_with_environment(algo.as_stateful_wrapper(transformer_target), env,
                                                              n_trials=1))
        else:
            rets.append(evaluate_qlearning_with_environment(algo, env, n_trials=1))
    env.close()
    return rets


class LearningCurve:
    """The harness's learning curve, a ``fit`` callback: at ``profile.curve_points - 1`` evenly spaced steps before
    the last it evaluates the model with ``profile.curve_episodes`` episodes (IPD: the weights ``fit`` would deploy
    then, the weight average if configured) and keeps the point in ``points``; ``eval_time`` is the time spent
    evaluating, which a row's training time leaves out. The final point is the run's own final evaluation."""

    def __init__(self, profile: Profile, steps: int, env_id: Any, seed: int, ref,
                 transformer_target: Optional[float] = None) -> None:
        self.marks = {round(steps * i / profile.curve_points) for i in range(1, profile.curve_points)}
        self.episodes, self.env_id, self.seed, self.ref = profile.curve_episodes, env_id, seed, ref
        self.transformer_target = transformer_target
        self.points: list[dict] = []
        self.eval_time = 0.0

    def __call__(self, model: Any, epoch: int, step: int) -> None:
        if step not in self.marks:  # called after every step: return before anything else
            return
        from .algo import IPD
        from .data import normalized_score

        members = isinstance(model, IPD) and model.impl.n_members > 1
        if members and model.training_member != 0:
            return  # the members train one after another, each from step 1: the curve is member 0's, alone
        te = time.perf_counter()
        # d3rlpy's algorithms switch to eval mode themselves; the policy is made inside the block, which restores
        # the training mode the network had on entry
        with model.deployed_weights() if isinstance(model, IPD) else contextlib.nullcontext():
            policy = model.as_stateful_wrapper(members=[0]) if members else None
            r = evaluate(model, self.env_id, self.episodes, self.seed, self.transformer_target, policy=policy)
        self.points.append({"step": step, "normalized_score": float(np.mean([normalized_score(x, self.ref) for x in r]))})
        self.eval_time += time.perf_counter() - te


def run_one(algo_name: str, dataset_id: str, seed: int, profile: Profile, out_dir: str, tag: str = "",
            ipd_overrides: Optional[dict] = None, dataset_root: Optional[str] = None) -> dict:
    """Trains and evaluates one (algorithm, dataset, seed); skips it if its result file exists."""
    import torch

    torch.set_num_threads(profile.threads)
    label = _run_label(algo_name, tag)
    path = row_path(out_dir, dataset_id, label, seed)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if dataset_root:
        os.environ["MINARI_DATASETS_PATH"] = dataset_root
    import d3rlpy

    from .data import load_minari, normalized_score, reference_scores

    traj, meta = load_minari(dataset_id)
    env_id = meta["env_id"]
    ref = reference_scores(meta)
    d3rlpy.seed(seed)
    logdir = os.path.join(out_dir, "logs")
    adapter = d3rlpy.logging.FileAdapterFactory(root_dir=logdir)
    t0 = time.perf_counter()
    stage_times, extra, config = {}, {}, {}
    target = None
    if algo_name == "dt":
        target = next((v for k, v in profile.dt_target_return.items() if env_id.startswith(k)), 3600.0)
    eval_env = meta.get("env_spec") or env_id
    steps = profile.transformer_steps if algo_name in ("ipd", "dt") else profile.q_steps
    curve = LearningCurve(profile, steps, eval_env, seed, ref, target)

    if algo_name == "ipd":
        cfg = make_ipd_config(profile, seed, ipd_overrides)
        algo, pre_times = prefit_ipd(cfg, traj, dataset_id, out_dir, stage_config(profile, seed, ipd_overrides),
                                     profile.device)
        t0 = time.perf_counter()  # stages 1-2 are timed by the prefit and added below
        out = algo.fit(traj, n_steps=profile.transformer_steps, n_steps_per_epoch=max(1, profile.transformer_steps),
                       experiment_name=f"{label}_{dataset_id.replace('/', '_')}_s{seed}", logger_adapter=adapter,
                       show_progress=False, callback=curve)
        stage_times = {**pre_times, **{k: v for k, v in out["stage_times"].items() if k not in pre_times}}
        extra = {"augmentation": out["augmentation"]}
        config = json.loads(cfg.serialize())
    else:
        algo = _baseline(algo_name, profile, profile.device)
        ds = traj.to_d3rlpy()
        algo.fit(ds, n_steps=steps, n_steps_per_epoch=steps, experiment_name=f"{label}_{dataset_id.replace('/', '_')}_s{seed}",
                 logger_adapter=adapter, show_progress=False, save_interval=10**9, callback=curve)
        config = json.loads(algo.config.serialize())
    train_time = time.perf_counter() - t0 - curve.eval_time
    if algo_name == "ipd":
        train_time += pre_times.get("value", 0.0) + pre_times.get("world_model", 0.0)
    rets = evaluate(algo, eval_env, profile.eval_episodes, seed, target)
    scores = [normalized_score(r, ref) for r in rets]
    points = curve.points + [{"step": steps, "normalized_score": float(np.mean(scores))}]
    if algo_name == "ipd":
        extra["target_rtg"] = _target_rtg_eval(algo, traj, eval_env, profile.eval_episodes, seed, ref)
        model_path = os.path.join(out_dir, "models", dataset_id.replace("/", "__"), f"{label}_seed{seed}.d3")
        os.makedirs(os.path.dirname(model_path), exist_ok=True)
        algo.save(model_path + ".tmp")
        os.replace(model_path + ".tmp", model_path)  # kept for diagnostics (benchmarks/diagnose_augmentation.py)
    import resource

    row = {
        "algo": label, "dataset": dataset_id, "env_id": env_id, "seed": seed,
        "return_mean": float(np.mean(rets)), "returns": [float(r) for r in rets],
        "normalized_score": float(np.mean(scores)), "train_wall_time_s": train_time,
        "stage_times_s": stage_times, "profile": dataclasses.asdict(profile),
        "gradient_steps": steps, "learning_curve": points,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # whole process, one run each
        "versions": versions(), "config": config, **extra,
    }
    write_row(path, row)
    return row


def _run_label(algo_name: str, tag: str = "") -> str:
    """The name a run's row carries (and its file is named by): the algorithm, with the variant tag if any."""
    return algo_name + (f"-{tag}" if tag else "")


def row_path(out_dir: str, dataset_id: str, label: str, seed: int) -> str:
    return os.path.join(out_dir, "runs", dataset_id.replace("/", "__"), f"{label}_seed{seed}.json")


def write_row(path: str, row: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(row, f, indent=1)
    os.replace(tmp, path)  # atomic: a half-written result is never read as finished


def _target_rtg_eval(algo, traj, env, episodes: int, seed: int, ref) -> dict:
    """The same trained IPD deployed DT-style: a fixed target return instead of the state-dependent token (ablation).

    The target is the highest return token of the real data on the model's own (discounted, value) scale, i.e.
    "ask for the best the data reached"; it then counts down by each reward, as in DT.
    """
    from d3rlpy.metrics import evaluate_transformer_with_environment
    import gymnasium as gym

    from .augment import batched_values
    from .data import normalized_score
    from .transformer import value_returns_to_go

    cfg = algo.config
    g = value_returns_to_go(traj, batched_values(algo.impl.value, traj.next_observations), cfg.gamma,
                            cfg.transformer.rtg_relabel)
    target = float(g.max())
    e = gym.make(env)
    e.reset(seed=10_000 + seed)
    rets = [evaluate_transformer_with_environment(algo.as_stateful_wrapper(target, rtg_mode="target"), e, n_trials=1)
            for _ in range(episodes)]
    e.close()
    return {"target": target, "returns": [float(r) for r in rets],
            "normalized_score": float(np.mean([normalized_score(r, ref) for r in rets]))}


def _prefit_key(cfg, dataset_id: str, device: str = "cpu:0") -> str:
    import hashlib

    d = json.loads(cfg.serialize())
    keep = {k: d[k] for k in ("seed", "gamma", "context_size", "value", "world_model", "transformer")}
    # the transformer is built with the model (its initial weights are drawn before the world model's), so its
    # architecture is part of the key; stage_config gives every variant of one profile the same one
    keep["transformer"] = {k: v for k, v in keep["transformer"].items()
                           if k in ("hidden_size", "n_layers", "n_heads", "tokens_per_step")}
    if not device.startswith("cpu"):  # stages fitted on a GPU differ in the last bits; CPU keys stay as they were
        keep["device"] = device.split(":")[0]
    return hashlib.sha1(json.dumps([dataset_id, keep], sort_keys=True).encode()).hexdigest()[:12]


def stage_config(profile: Profile, seed: int, overrides: Optional[dict] = None):
    """The config stages 1-2 are fitted under: the variant's own value / world-model settings, the profile's own
    transformer. The world model's initial weights are drawn after the transformer's, so fitting under a variant's
    transformer (another token layout, say) would tie them to it, and a shared cache to whichever variant ran first.
    This way every transformer variant of a profile (ablations, layouts, sizes) uses the world model and value
    function ``ipd`` uses, and only its transformer differs."""
    cfg = make_ipd_config(profile, seed, overrides)
    cfg.transformer = make_ipd_config(profile, seed, None).transformer
    return cfg


def prefit_ipd(cfg, traj, dataset_id: str, out_dir: str, stages=None, device: str = "cpu:0"):
    """IPD with stages 1-2 (IQL value, world model) fitted once per (dataset, seed, settings) and cached.

    Args:
        cfg: the run's config; the returned model is built from it.
        stages: the config stages 1-2 are fitted under (``stage_config``; default ``cfg``). Runs whose ``stages``
            agree share the fit, exactly as a user would by calling ``fit`` again with other augmentation settings.
        device: torch device of the fit and of the returned model (part of the cache key unless a CPU).
    """
    import copy

    from .algo import load_ipd

    stages = cfg if stages is None else stages
    key = _prefit_key(stages, dataset_id, device)
    path = os.path.join(out_dir, "cache", f"{dataset_id.replace('/', '__')}__s{cfg.seed}__{key}.d3")
    times_path = path + ".json"
    if os.path.exists(path) and os.path.exists(times_path):
        with open(times_path) as f:
            return _with_fitted_stages(cfg, load_ipd(path, device), device), json.load(f)
    import d3rlpy

    base = copy.deepcopy(stages)
    base.augment.enabled = False
    algo = base.create(device=device)
    algo.fit(traj, n_steps=0, show_progress=False, logger_adapter=d3rlpy.logging.NoopAdapterFactory())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    algo.save(path + ".tmp")
    os.replace(path + ".tmp", path)
    times = {k: algo.stage_times[k] for k in ("value", "world_model")}
    write_row(times_path, times)  # atomic, as the cache itself: a killed sweep leaves no half-written file
    return _with_fitted_stages(cfg, load_ipd(path, device), device), times


def _with_fitted_stages(cfg, cached, device: str = "cpu:0"):
    """A model built from ``cfg`` (its transformer initialised exactly as a fresh ``fit`` would) that holds the cached
    model's fitted value function and world model, so ``fit`` goes straight to augmentation and the transformer."""
    algo = cfg.create(device=device)
    algo.create_impl(cached.impl.observation_shape, cached.impl.action_size)
    for name in ("value", "world_model", "stages"):
        getattr(algo.impl, name).load_state_dict(getattr(cached.impl, name).state_dict())
    return algo


def _prefit_job(dataset_id: str, seed: int, profile: Profile, out_dir: str, overrides, dataset_root) -> str:
    import torch

    torch.set_num_threads(profile.threads)
    if dataset_root:
        os.environ["MINARI_DATASETS_PATH"] = dataset_root
    from .data import load_minari

    traj, _ = load_minari(dataset_id)
    prefit_ipd(make_ipd_config(profile, seed, overrides), traj, dataset_id, out_dir,
               stage_config(profile, seed, overrides), profile.device)
    return dataset_id


def _job_row_path(out_dir: str, job: dict) -> str:
    return row_path(out_dir, job["dataset"], _run_label(job["algo"], job.get("tag", "")), job["seed"])


def _finished_rows(jobs: list[dict], out_dir: str) -> tuple[list[dict], list[dict]]:
    """(rows of the jobs already run, the jobs still to run)."""
    rows, todo = [], []
    for j in jobs:
        path = _job_row_path(out_dir, j)
        if os.path.exists(path):
            with open(path) as f:
                rows.append(json.load(f))
        else:
            todo.append(j)
    return rows, todo


def _stages_key(job: dict, profile: Profile) -> tuple:
    """Which fit of stages 1-2 an IPD job uses."""
    return job["dataset"], _prefit_key(stage_config(profile, job["seed"], job.get("ipd_overrides")), job["dataset"],
                                       profile.device)


def _prefits_needed(jobs: list[dict], profile: Profile, out_dir: str) -> list[dict]:
    """One IPD job per distinct (dataset, stage 1-2 settings) among the unfinished IPD jobs: the sweep fits stages 1-2
    for these first, so variants that share them never race to fit them twice."""
    needed, seen = [], set()
    for j in jobs:
        if j["algo"] != "ipd" or os.path.exists(_job_row_path(out_dir, j)):
            continue
        key = _stages_key(j, profile)
        if key not in seen:
            seen.add(key)
            needed.append(j)
    return needed


def _report(row: dict, show_progress: bool) -> None:
    if show_progress:
        from tqdm.auto import tqdm

        tqdm.write(f"{row['algo']:>14s} {row['dataset']:<40s} seed {row['seed']}: "
                   f"{row['normalized_score']:6.1f} ({row['train_wall_time_s']:.0f}s)")


def _ray_sweep(jobs: list[dict], profile: Profile, out_dir: str, dataset_root: Optional[str], address: str,
               show_progress: bool) -> list[dict]:
    """The same sweep as Ray tasks (one CPU each per torch thread). Every node needs ipd-agent and the datasets at
    ``dataset_root``; result rows come back to this process and are written under ``out_dir`` here as well."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError("--ray-address needs Ray: pip install 'ipd-agent[ray]' (or pip install ray)") from exc
    from tqdm.auto import tqdm

    ray.init(address=None if address == "local" else address, ignore_reinit_error=True, log_to_driver=False,
             include_dashboard=False)
    try:
        out_abs = os.path.abspath(out_dir)
        remote_prefit = ray.remote(num_cpus=profile.threads)(_prefit_job)
        remote_run = ray.remote(num_cpus=profile.threads)(run_one)  # Ray reuses workers: peak RSS is the worker's
        ray.get([remote_prefit.remote(j["dataset"], j["seed"], profile, out_abs, j.get("ipd_overrides"), dataset_root)
                 for j in _prefits_needed(jobs, profile, out_dir)])
        refs = [remote_run.remote(j["algo"], j["dataset"], j["seed"], profile, out_abs, j.get("tag", ""),
                                  j.get("ipd_overrides"), dataset_root) for j in jobs]
        rows, pending = [], list(refs)
        with tqdm(total=len(refs), desc="runs (ray)", disable=not show_progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                row = ray.get(done[0])
                write_row(row_path(out_dir, row["dataset"], row["algo"], row["seed"]), row)
                rows.append(row)
                _report(row, show_progress)
                bar.update(1)
        return rows
    finally:
        ray.shutdown()


def _exit_with_parent() -> None:
    """Pool-worker initializer: the worker ends as soon as the sweep's process ends, however it ended.

    Killing a sweep (``kill PID``, a closed terminal, an out-of-memory kill) otherwise leaves its spawned workers
    training on as orphans, holding the CPU and writing rows nobody waits for. A daemon thread blocks on the parent's
    sentinel, which becomes ready when the parent exits, and then ends the worker at once. A run that is cut short
    writes no row, so resuming the sweep re-runs it; finished rows and fitted stages are kept (both written
    atomically)."""
    import multiprocessing
    import threading
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:  # not a spawned child (e.g. called directly): nothing to watch
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def check_jobs(jobs: list[dict], dataset_root: Optional[str] = None, datasets: bool = True) -> None:
    """Refuses a sweep with an unknown algorithm or a dataset this machine cannot open, before any worker starts: a
    bad entry would otherwise end the sweep only when its turn came, possibly hours in."""
    from .data import open_minari

    unknown = sorted({j["algo"] for j in jobs} - set(ALGOS))
    if unknown:
        raise ValueError(f"unknown algorithm(s) {unknown}; choose from {ALGOS}")
    if not datasets:
        return
    old = os.environ.get("MINARI_DATASETS_PATH")
    if dataset_root:
        os.environ["MINARI_DATASETS_PATH"] = dataset_root  # where the workers will look
    try:
        for d in sorted({j["dataset"] for j in jobs}):
            open_minari(d)  # metadata only: the episodes are read by the run itself
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def run_sweep(jobs: list[dict], profile: Profile, out_dir: str, workers: int = 2, dataset_root: Optional[str] = None,
              show_progress: bool = True, ray_address: Optional[str] = None) -> list[dict]:
    """Runs jobs ``{"algo", "dataset", "seed", ["tag", "ipd_overrides"]}`` in parallel processes.

    ``ray_address`` ("auto", "ray://host:10001", or "local" for a throw-away local cluster) sends the same runs to
    Ray instead of a local process pool.
    """
    rows, jobs = _finished_rows(jobs, out_dir)  # read back here: no worker process is started for them
    if not jobs:
        return rows
    # Ray workers may see other folders than this machine: only the algorithms are checked here for them
    check_jobs(jobs, dataset_root, datasets=not ray_address)
    if ray_address:
        return rows + _ray_sweep(jobs, profile, out_dir, dataset_root, ray_address, show_progress)
    try:
        return rows + _pool_sweep(jobs, profile, out_dir, workers, dataset_root, show_progress)
    except BrokenProcessPool as exc:
        raise RuntimeError(
            f"A worker process of the sweep died before its run finished (finished runs are kept under {out_dir}/runs "
            "and skipped next time). Usual causes: the machine ran out of memory (use fewer workers), the worker was "
            "killed, or run_sweep was called at the top level of a script without an `if __name__ == \"__main__\":` "
            "guard: workers are started with 'spawn' and import the script again.") from exc


def _pool_sweep(jobs: list[dict], profile: Profile, out_dir: str, workers: int, dataset_root: Optional[str],
                show_progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    rows = []
    # a fresh process per run ('spawn', as max_tasks_per_child implies): no state carried between runs, and peak
    # memory is the run's own
    with ProcessPoolExecutor(max_workers=workers, max_tasks_per_child=1, initializer=_exit_with_parent) as pool:
        # stages 1-2 first, once per (dataset, seed, settings), so variants never race to fit them
        pre = {pool.submit(_prefit_job, j["dataset"], j["seed"], profile, out_dir, j.get("ipd_overrides"),
                           dataset_root): _stages_key(j, profile)
               for j in _prefits_needed(jobs, profile, out_dir)}
        # IPD jobs grouped by the stages 1-2 they share, so each prefit's completion queues its own runs at once
        ipd_by_stages: dict = {}
        for j in jobs:
            if j["algo"] == "ipd":
                ipd_by_stages.setdefault(_stages_key(j, profile), []).append(j)

        def submit(j):
            return pool.submit(run_one, j["algo"], j["dataset"], j["seed"], profile, out_dir, j.get("tag", ""),
                               j.get("ipd_overrides"), dataset_root)

        futs = {submit(j): j for j in jobs if j["algo"] != "ipd"}  # baselines queue behind the prefits
        # each IPD run is queued as soon as its own stages 1-2 are fitted, not after every prefit of the sweep
        for fut in tqdm(as_completed(pre), total=len(pre), desc="value + world model", disable=not show_progress):
            fut.result()
            futs.update({submit(j): j for j in ipd_by_stages.pop(pre[fut], [])})
        for fut in tqdm(as_completed(futs), total=len(futs), desc="runs", disable=not show_progress):
            row = fut.result()
            rows.append(row)
            _report(row, show_progress)
    return rows


def summarise(rows: list[dict]) -> dict:
    """{dataset: {algo: (mean, std, n)}} of normalised scores."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["dataset"], {}).setdefault(r["algo"], []).append(r["normalized_score"])
    return {d: {a: (float(np.mean(v)), float(np.std(v)), len(v)) for a, v in algos.items()} for d, algos in out.items()}


def markdown_table(rows: list[dict], algos: Optional[list[str]] = None) -> str:
    summ = summarise(rows)
    algos = algos or sorted({r["algo"] for r in rows})
    lines = ["| dataset | " + " | ".join(algos) + " |", "|---|" + "---|" * len(algos)]
    for d in sorted(summ):
        cells = []
        for a in algos:
            if a in summ[d]:
                m, s, n = summ[d][a]
                cells.append(f"{m:.1f} ± {s:.1f}")
            else:
                cells.append("–")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
