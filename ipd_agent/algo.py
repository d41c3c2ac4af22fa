"""IPD as a d3rlpy algorithm: ``IPDConfig(...).create()``, ``fit``, ``predict``, save / ``d3rlpy.load_learnable``.

``IPD.fit`` runs the stages in the order data flows through them::

    value (d3rlpy IQL) -> world model -> branch points + MPC rollouts + splice (augment) -> transformer

Each stage shows a progress bar, logs through d3rlpy's logger adapters and is skipped when it is
already done (value and world model are saved with the model; the augmentation is cached and
re-run only when the augmentation settings change), so a user can fit the value function once and
try several augmentation settings.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Optional, Union

import d3rlpy
import numpy as np
import torch
from d3rlpy.algos.transformer.base import TransformerAlgoBase, TransformerAlgoImplBase, TransformerConfig
from d3rlpy.algos.transformer.inputs import TorchTransformerInput, TransformerInput
from d3rlpy.base import DeviceArg, register_learnable
from d3rlpy.constants import ActionSpace
from d3rlpy.logging import D3RLPyLogger, FileAdapterFactory, LoggerAdapterFactory
from d3rlpy.metrics import evaluate_transformer_with_environment
from d3rlpy.torch_utility import Modules
from torch import nn
from tqdm.auto import tqdm

from .augment import AugmentationResult, augment, batched_values
from .config import AugmentConfig, PlannerConfig, TransformerNetConfig, ValueConfig, WorldModelConfig, native_cpu_bf16
from .data import DatasetError, Trajectories, check_unit_box, to_trajectories
from .planner import PLANNER_EXECUTE, MPCPlanner
from .policy import IPDPolicy, StatefulIPDWrapper, median_action
from .transformer import (EMA_WARMUPS, LR_SCHEDULES, RTG_RELABELS, CausalTransformer, ReturnTokenModel, WindowSampler,
                          WeightAverage, advantage_weights, fit_return_token_model, lr_lambda, set_token_floor,
                          taught_rows, value_guided_loss, value_returns_to_go)
from .value import ValueFunctions, fit_value_functions, make_iql, module_device
from .world_model import WorldModel, fit_world_model

__all__ = ["IPDConfig", "IPD", "IPDImpl", "load_ipd"]

STAGES = ("value", "world_model", "transformer")
MEMBER_SEED_STRIDE = 1000  # member m of transformer.n_members trains under seed + 1000 m, far from any other seed


def _short_hash(obj) -> int:
    """A 60-bit hash of a JSON-able object (or string), small enough for an int64 buffer saved with the model."""
    text = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True)
    return int(hashlib.sha1(text.encode()).hexdigest()[:15], 16)


@dataclasses.dataclass()
class IPDConfig(TransformerConfig):
    """Config of Imaginary Planning Distillation.

    Args:
        batch_size: transformer mini-batch (windows); kept in sync with ``transformer.batch_size``.
        gamma: discount factor for values, planning and return tokens.
        context_size: K, the number of (g, s, a) steps the transformer sees.
        max_timestep: unused by IPD (positions are inside the window); kept for d3rlpy compatibility.
        seed: seeds every stage (IQL, world model, branch sampling, MPC noise, transformer).
        value: IQL value-function settings (stage 1).
        world_model: ensemble dynamics model settings (stage 2).
        planner: MPPI settings (stage 4).
        augment: branch points, rollout length and acceptance (stages 3-5).
        transformer: value-guided transformer settings (stage 6).
    """

    batch_size: int = 64
    gamma: float = 0.99
    context_size: int = 20
    max_timestep: int = 1000
    seed: int = 0
    value: ValueConfig = dataclasses.field(default_factory=ValueConfig)
    world_model: WorldModelConfig = dataclasses.field(default_factory=WorldModelConfig)
    planner: PlannerConfig = dataclasses.field(default_factory=PlannerConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    transformer: TransformerNetConfig = dataclasses.field(default_factory=TransformerNetConfig)

    def __post_init__(self) -> None:
        for name, typ in (("value", ValueConfig), ("world_model", WorldModelConfig), ("planner", PlannerConfig),
                          ("augment", AugmentConfig), ("transformer", TransformerNetConfig)):
            sub = getattr(self, name)
            if isinstance(sub, dict):  # allow IPDConfig(world_model={"n_members": 5})
                unknown = set(sub) - {f.name for f in dataclasses.fields(typ)}
                if unknown:
                    raise ValueError(f"unknown {name} config field(s) {sorted(unknown)}; valid: "
                                     f"{[f.name for f in dataclasses.fields(typ)]}")
                setattr(self, name, typ(**sub))
        # d3rlpy's top-level batch_size and transformer.batch_size are one setting: a changed one wins
        default_bs = TransformerNetConfig().batch_size
        if self.batch_size != default_bs and self.transformer.batch_size == default_bs:
            self.transformer.batch_size = self.batch_size
        self.batch_size = self.transformer.batch_size
        for section, field, allowed in (("transformer", "return_token", ("upper", "value")),
                                        ("transformer", "rtg_relabel", RTG_RELABELS),
                                        ("transformer", "lr_schedule", LR_SCHEDULES),
                                        ("transformer", "ema_warmup", EMA_WARMUPS),
                                        ("planner", "execute", PLANNER_EXECUTE)):
            got = getattr(getattr(self, section), field)
            if got not in allowed:  # caught here, not after hours of fitting
                raise ValueError(f"{section}.{field} must be one of {allowed}, got {got!r}")
        floor = self.transformer.token_floor
        if floor is not None and not (0.0 <= floor <= 1.0 and self.transformer.return_token == "upper"):
            raise ValueError(f"transformer.token_floor is a quantile in [0, 1] of the token model's g(s) over the data "
                             f"(return_token='upper'), or None; got {floor!r} with return_token="
                             f"{self.transformer.return_token!r}")
        if self.transformer.token_ratchet and self.transformer.return_token != "upper":
            raise ValueError("transformer.token_ratchet holds the running maximum of the token model's g(s) "
                             "(return_token='upper'); got return_token="
                             f"{self.transformer.return_token!r}. Set token_ratchet=False or return_token='upper'.")
        beta = self.transformer.advantage_weight
        if not (math.isfinite(beta) and beta >= 0.0):
            raise ValueError(f"transformer.advantage_weight must be a finite number >= 0 (0 weighs every action "
                             f"alike; IQL's actor uses 3), got {beta!r}")
        n = self.transformer.n_members
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"transformer.n_members is the number of separately seeded policies deployed together "
                             f"(1: a single policy; 3 is the tested ensemble), got {n!r}")
        if not 0.0 <= self.transformer.ema_decay < 1.0:
            raise ValueError(f"transformer.ema_decay must be in [0, 1) (0 deploys the last iterate), got "
                             f"{self.transformer.ema_decay}")
        if isinstance(self.value.hidden_units, list):
            self.value.hidden_units = tuple(self.value.hidden_units)

    @classmethod
    def from_settings(cls, settings: dict) -> "IPDConfig":
        """Builds from a plain (JSON) dict, naming any key that is not a setting instead of a TypeError."""
        unknown = set(settings) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown IPDConfig field(s) {sorted(unknown)}; valid: "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**settings)  # nested dicts are checked and converted in __post_init__

    def create(self, device: DeviceArg = False, enable_ddp: bool = False) -> "IPD":
        return IPD(self, device, enable_ddp)

    @staticmethod
    def get_type() -> str:
        return "ipd"


class StageFlags(nn.Module):
    """Which stages are done, saved with the model so a loaded model knows what it has."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("done", torch.zeros(len(STAGES), dtype=torch.bool))
        self.register_buffer("transformer_steps", torch.zeros((), dtype=torch.long))
        # hash of the augmentation (settings + data) the transformer was trained on
        self.register_buffer("augment_key", torch.zeros((), dtype=torch.long))
        # hash of the data and settings the value function and world model were fitted with (0: not recorded)
        self.register_buffer("data_key", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("augment_key", "data_key"):  # older checkpoints
            state_dict.setdefault(prefix + name, torch.zeros((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def is_done(self, stage: str) -> bool:
        return bool(self.done[STAGES.index(stage)])

    def mark(self, stage: str, value: bool = True) -> None:
        self.done[STAGES.index(stage)] = value


class PolicyMember(nn.Module):
    """One more stage-6 policy of ``transformer.n_members``: its transformer, its return-token model and its own
    training flags (done, steps); member 0 is the model's ``transformer``, ``token`` and ``stages``."""

    def __init__(self, obs_dim: int, act_dim: int, context: int, cfg: TransformerNetConfig) -> None:
        super().__init__()
        self.transformer = CausalTransformer(obs_dim, act_dim, context, cfg)
        self.token = ReturnTokenModel(obs_dim)
        self.stages = StageFlags()


@dataclasses.dataclass(frozen=True)
class IPDModules(Modules):
    transformer: CausalTransformer
    token: ReturnTokenModel
    value: ValueFunctions
    world_model: WorldModel
    stages: StageFlags
    members: nn.ModuleList  # PolicyMember 1 .. n_members - 1 (empty for a single policy)


class IPDImpl(TransformerAlgoImplBase):
    """Holds the networks; the math of each stage lives in the module named after it."""

    _modules: IPDModules

    def __init__(self, observation_shape, action_size: int, modules: IPDModules, device: str, iql) -> None:
        super().__init__(observation_shape, action_size, modules, device)
        self.iql = iql  # d3rlpy IQL whose networks ValueFunctions wraps; used to train stage 1

    @property
    def transformer(self) -> CausalTransformer:
        return self._modules.transformer

    @property
    def token(self) -> ReturnTokenModel:
        return self._modules.token

    def load_model(self, f) -> None:
        """d3rlpy's loader, also for models saved before the return-token model existed (it stays unfitted)."""
        import io

        chkpt = torch.load(f, map_location="cpu", weights_only=False)
        if "token" not in chkpt:
            chkpt["token"] = ReturnTokenModel(self.observation_shape[0]).state_dict()  # unfitted
        if "members" not in chkpt:  # saved before transformer.n_members existed: a single policy
            chkpt["members"] = self._modules.members.state_dict()
        buf = io.BytesIO()
        torch.save(chkpt, buf)
        buf.seek(0)
        super().load_model(buf)

    @property
    def value(self) -> ValueFunctions:
        return self._modules.value

    @property
    def world_model(self) -> WorldModel:
        return self._modules.world_model

    @property
    def stages(self) -> StageFlags:
        return self._modules.stages

    def member(self, m: int) -> tuple[CausalTransformer, ReturnTokenModel, StageFlags]:
        """Member ``m``'s transformer, return-token model and training flags (member 0: the model's own)."""
        if m == 0:
            return self.transformer, self.token, self.stages
        part = self._modules.members[m - 1]
        return part.transformer, part.token, part.stages

    @property
    def n_members(self) -> int:
        return 1 + len(self._modules.members)

    def inner_predict(self, inpt: TorchTransformerInput) -> torch.Tensor:
        """d3rlpy transformer semantics: the action for the last step of the given context."""
        valid = inpt.masks[0] > 0  # d3rlpy left-pads short contexts; our windows start at position 0
        obs = inpt.observations[:, valid]
        act = inpt.actions[:, valid]
        rtg = inpt.returns_to_go[:, valid].reshape(1, -1)
        nets = [self.member(m)[0] for m in range(self.n_members)]
        return median_action([net(obs, act, rtg)[0, -1] for net in nets])

    def inner_update(self, batch, grad_step: int) -> dict[str, float]:  # pragma: no cover - IPD has its own loop
        raise NotImplementedError("IPD trains through IPD.fit")


class IPD(TransformerAlgoBase[IPDImpl, IPDConfig]):
    """Imaginary Planning Distillation (Qin et al., AAMAS 2026) on top of d3rlpy's transformer base."""

    def __init__(self, config: IPDConfig, device: DeviceArg, enable_ddp: bool = False) -> None:
        super().__init__(config, device, enable_ddp)
        self.augmentation: Optional[AugmentationResult] = None
        self._augmentation_key: Optional[str] = None
        self.stage_times: dict[str, float] = {}
        self.stage_metrics: dict[str, Any] = {}
        # the member whose transformer is training now, for fit callbacks (None outside stage 6): with
        # transformer.n_members > 1 the members train one after another, each counting its steps from 1
        self.training_member: Optional[int] = None

    def get_action_type(self) -> ActionSpace:
        return ActionSpace.CONTINUOUS

    # ----- building ------------------------------------------------------------------------
    def inner_create_impl(self, observation_shape, action_size: int) -> None:
        if isinstance(observation_shape, int):
            observation_shape = (observation_shape,)
        observation_shape = tuple(observation_shape)
        cfg = self._config
        with torch.random.fork_rng():  # seeded initialisation without touching the caller's global RNG
            torch.manual_seed(cfg.seed)
            iql = make_iql(cfg.value, self._device)
            iql.create_impl(observation_shape, action_size)
            modules = IPDModules(
                transformer=CausalTransformer(observation_shape[0], action_size, cfg.context_size, cfg.transformer),
                token=ReturnTokenModel(observation_shape[0]),
                value=ValueFunctions(iql),
                world_model=WorldModel(observation_shape[0], action_size, cfg.world_model),
                stages=StageFlags(),
                # built last, so member 0 and stages 1-2 start as they do without members; each member is
                # re-initialised under its own seed when its training starts
                members=nn.ModuleList(PolicyMember(observation_shape[0], action_size, cfg.context_size, cfg.transformer)
                                      for _ in range(cfg.transformer.n_members - 1)),
            )
        for module in (modules.transformer, modules.token, modules.value, modules.world_model, modules.stages,
                       modules.members):
            module.to(self._device)  # built on the CPU under the seeded RNG, so CPU and GPU models start alike
        self._impl = IPDImpl(observation_shape, action_size, modules, self._device, iql)

    # ----- the whole method ----------------------------------------------------------------
    def fit(  # type: ignore[override]
        self,
        dataset: Any,
        n_steps: Optional[int] = None,
        n_steps_per_epoch: int = 1000,
        experiment_name: Optional[str] = None,
        with_timestamp: bool = True,
        logger_adapter: LoggerAdapterFactory = FileAdapterFactory(),
        show_progress: bool = True,
        eval_env: Any = None,
        eval_episodes: int = 10,
        save_interval: int = 10**9,
        callback: Optional[Callable[["IPD", int, int], None]] = None,
        checkpoint_dir: Optional[str] = None,
        checkpoint_every: int = 1000,
        resume: bool = False,
    ) -> dict:
        """Runs every IPD stage that is not done yet, then trains the transformer for ``n_steps``.

        Args:
            dataset: d3rlpy ReplayBuffer/MDPDataset, Minari dataset, Minari id or local path, or Trajectories.
            n_steps: transformer gradient steps (default: ``config.transformer.n_steps``).
            n_steps_per_epoch: transformer steps between logger commits / evaluations.
            experiment_name: d3rlpy log directory name (default ``IPD``).
            with_timestamp: append a timestamp to the log directory name.
            logger_adapter: d3rlpy logger adapter factory (file, tensorboard, ...).
            show_progress: progress bars for every stage.
            eval_env: optional Gymnasium env evaluated (value-conditioned) at every epoch end.
            eval_episodes: episodes per evaluation.
            save_interval: save the model every this many epochs.
            callback: called as ``callback(algo, epoch, total_step)`` after every transformer step.
            checkpoint_dir: if set, the model is written there (atomically) after every stage and every
                ``checkpoint_every`` transformer steps, with the augmentation and the optimiser/RNG state.
            checkpoint_every: transformer steps between checkpoints.
            resume: continue from ``checkpoint_dir``: finished stages are skipped and the transformer picks up at
                its last saved step, reaching the same final state as an uninterrupted run.

        Returns:
            dict with per-stage wall time, the augmentation summary and the last losses.
        """
        traj, meta = to_trajectories(dataset)
        self._check_data(traj)
        if eval_env is not None:
            self._check_env(eval_env, traj)
        if self._impl is None:
            self.create_impl((traj.observation_dim,), traj.action_dim)
        if resume:
            if checkpoint_dir is None:
                raise ValueError("fit(resume=True) needs checkpoint_dir, the folder a previous fit wrote to")
            self._load_checkpoint(checkpoint_dir)
        impl = self._impl
        cfg = self._config
        n_steps = cfg.transformer.n_steps if n_steps is None else n_steps
        self._check_schedule(n_steps, resume)
        fingerprint = traj.fingerprint()  # one pass over the data, for both cache keys below
        data_key = _short_hash([cfg.value.to_dict(), cfg.world_model.to_dict(), cfg.gamma, fingerprint])
        fitted_key = int(impl.stages.data_key)
        if (impl.stages.is_done("value") or impl.stages.is_done("world_model")) and fitted_key not in (0, data_key):
            raise DatasetError(
                "This model's value function and world model were fitted on other data, or with other value / "
                "world_model settings, than this fit() was given. fit() continues a model on the data it was fitted "
                "on; to train on new data (or with new value / world-model settings) create a fresh model with "
                "IPDConfig(...).create()."
            )
        name = experiment_name or "IPD"
        logger = D3RLPyLogger(algo=self, adapter_factory=logger_adapter, experiment_name=name,
                              n_steps_per_epoch=n_steps_per_epoch, with_timestamp=with_timestamp)
        d3rlpy.base.save_config(self, logger)

        # stage 1: value function (d3rlpy IQL on the real data)
        if not impl.stages.is_done("value"):
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed)
            np.random.seed(cfg.seed)
            fit_value_functions(impl.iql, traj.to_d3rlpy(), cfg.value, logger_adapter, show_progress,
                                f"{name}_value_iql")
            impl.value.set_reward_scale(impl.iql.config.reward_scaler)
            impl.stages.mark("value")
            impl.stages.data_key.fill_(data_key)
            self.stage_times["value"] = time.perf_counter() - t0
            self._save_checkpoint(checkpoint_dir)
        impl.value.freeze()

        # stage 2: ensemble world model, elites and threshold κ
        if not impl.stages.is_done("world_model"):
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed)
            wm_metrics = fit_world_model(
                impl.world_model, traj.observations, traj.actions, traj.rewards, traj.next_observations,
                traj.terminals, seed=cfg.seed, show_progress=show_progress, log=None, next_known=traj.next_known,
            )
            impl.stages.mark("world_model")
            impl.stages.data_key.fill_(data_key)
            self.stage_times["world_model"] = time.perf_counter() - t0
            self._save_checkpoint(checkpoint_dir)
            self.stage_metrics["world_model"] = wm_metrics
            for k, v in wm_metrics.items():
                if not isinstance(v, list):
                    logger.add_metric(k, v)
        impl.world_model.eval()

        # stages 3-5: branch points, MPC rollouts, splicing (cached per augmentation settings)
        key = json.dumps([cfg.augment.to_dict(), cfg.planner.to_dict(), cfg.seed, cfg.gamma, fingerprint],
                         sort_keys=True)
        key_hash = _short_hash(key)
        if self.augmentation is None or self._augmentation_key != key:
            t0 = time.perf_counter()
            self.augmentation = self.augment(traj, show_progress=show_progress)
            self._augmentation_key = key
            self.stage_times["augment"] = time.perf_counter() - t0
            self.stage_metrics["augment"] = self.augmentation.summary()
            for k, v in self.stage_metrics["augment"].items():
                logger.add_metric(f"aug_{k}", v)
            if impl.stages.is_done("transformer") and int(impl.stages.augment_key) != key_hash:
                self._reset_transformer()  # new training data: start the policy afresh
            impl.stages.augment_key.fill_(key_hash)
            self._save_checkpoint(checkpoint_dir, augmentation=True)
        logger.commit(0, 0)

        # stage 6: value-guided transformer; with transformer.n_members > 1, member m is trained the same way on the
        # same data under seed + 1000 m, each logged under its own experiment name
        t0 = time.perf_counter()
        try:
            for m in range(impl.n_members):
                self.training_member = m
                member_logger = logger if m == 0 else D3RLPyLogger(
                    algo=self, adapter_factory=logger_adapter, experiment_name=f"{name}_member{m}",
                    n_steps_per_epoch=n_steps_per_epoch, with_timestamp=with_timestamp)
                out_m = self._fit_transformer(self.augmentation, n_steps, n_steps_per_epoch, member_logger,
                                              show_progress, eval_env, eval_episodes, save_interval, callback,
                                              checkpoint_dir, checkpoint_every, resume, member=m)
                if m == 0:
                    last = out_m  # member 0's last losses
                else:
                    member_logger.close()
        finally:
            self.training_member = None
        self.stage_times["transformer"] = self.stage_times.get("transformer", 0.0) + time.perf_counter() - t0
        logger.close()
        return {"stage_times": dict(self.stage_times), "augmentation": self.augmentation.summary(), "last": last}

    def _check_schedule(self, n_steps: int, resume: bool) -> None:
        """A cosine schedule ends at ``transformer.n_steps``: steps past it would train at rate 0 (wasted time)."""
        tcfg = self._config.transformer
        if tcfg.lr_schedule != "cosine":
            return
        # a fit continued in this process goes on with the same optimiser and schedule; a fresh, loaded or resumed
        # one counts from 0 (resume restores the schedule of the interrupted call, whose end is this call's n_steps)
        done = 0 if resume or getattr(self, "_optim", None) is None else int(self._sched.last_epoch)
        if done + n_steps > tcfg.n_steps:
            raise ValueError(
                f"transformer.lr_schedule='cosine' decays the learning rate to 0 at transformer.n_steps="
                f"{tcfg.n_steps}, but this fit would train to step {done + n_steps} of that schedule, and those steps "
                f"would not move the policy. Set transformer.n_steps to the whole budget ({done + n_steps}) when "
                f"creating the model, or use lr_schedule='constant'.")

    def augment(self, dataset: Any, show_progress: bool = True) -> AugmentationResult:
        """Runs only stages 3-5 (needs a fitted value function and world model)."""
        traj = dataset if isinstance(dataset, Trajectories) else to_trajectories(dataset)[0]
        impl = self._impl
        if impl is None or not (impl.stages.is_done("value") and impl.stages.is_done("world_model")):
            raise RuntimeError("augment() needs a fitted value function and world model: call fit() first.")
        self._check_data(traj)  # the same checks fit makes, before any planning
        cfg = self._config
        planner = MPCPlanner(impl.world_model, impl.value, cfg.planner, cfg.gamma)
        return augment(traj, impl.world_model, impl.value, planner, cfg.augment, cfg.gamma, cfg.seed, show_progress)

    def fit_return_token(self, augmentation: Optional[AugmentationResult] = None, expectile: Optional[float] = None,
                         rtg: Optional[np.ndarray] = None, member: Optional[int] = None) -> dict:
        """(Re)fits the return-token model: an upper expectile of the transformer's training tokens given the state.

        It only sets the inference token, so trying another ``expectile`` takes seconds and no transformer training
        (``benchmarks/token_sensitivity.py``). Args: ``augmentation`` the training data (default: this fit's);
        ``expectile`` overrides and updates ``transformer.token_expectile``; ``rtg`` precomputed tokens; ``member``
        the one member's model to fit (default: every member's, each under its own seed). Returns member 0's metrics.
        """
        impl, cfg, tcfg = self._impl, self._config, self._config.transformer
        aug = augmentation if augmentation is not None else self.augmentation
        if impl is None or aug is None or not impl.stages.is_done("value"):
            raise RuntimeError("fit_return_token needs a fitted value function and the augmented data: call fit() "
                               "first, or pass augmentation=algo.augment(dataset).")
        if expectile is not None:
            tcfg.token_expectile = float(expectile)
        traj = aug.trajectories
        if rtg is None:
            rtg = value_returns_to_go(traj, batched_values(impl.value, traj.next_observations), cfg.gamma,
                                      tcfg.rtg_relabel)
        learn = taught_rows(traj, aug.n_real_episodes)  # the same rows the transformer learns from
        data_rows = traj.episode_ids < aug.n_real_episodes  # the dataset's own states, once each
        for m in range(impl.n_members) if member is None else (member,):
            t0 = time.perf_counter()
            token = impl.member(m)[1]
            loss = fit_return_token_model(token, traj.observations[learn], rtg[learn], tcfg.token_expectile,
                                          tcfg.token_steps, seed=self._member_seed(m) + 3)
            floor = set_token_floor(token, traj.observations[data_rows], tcfg.token_floor)
            self.stage_metrics["return_token" + (f"_member{m}" if m else "")] = {
                "loss": loss, "seconds": time.perf_counter() - t0, "floor": floor}
        return self.stage_metrics["return_token" + (f"_member{member}" if member else "")]

    def _member_seed(self, m: int) -> int:
        return self._config.seed + MEMBER_SEED_STRIDE * m

    def _trainer(self, m: int) -> tuple:
        """Member ``m``'s optimiser, schedule and weight average (``None``s before its first step in this process);
        member 0's are ``_optim``, ``_sched`` and ``_weight_average``."""
        if m == 0:
            return getattr(self, "_optim", None), getattr(self, "_sched", None), getattr(self, "_weight_average", None)
        return getattr(self, "_member_trainers", {}).get(m, (None, None, None))

    def _set_trainer(self, m: int, optim, sched, ema) -> None:
        if m == 0:
            self._optim, self._sched, self._weight_average = optim, sched, ema
        else:
            self.__dict__.setdefault("_member_trainers", {})[m] = (optim, sched, ema)

    def _reset_transformer(self, member: Optional[int] = None) -> None:
        """Fresh initial weights (under the member's seed), an unfitted token model and no training state for
        ``member``, or for every member."""
        impl = self._impl
        cfg = self._config
        for m in range(impl.n_members) if member is None else (member,):
            net, token, flags = impl.member(m)
            torch.manual_seed(self._member_seed(m) + 1)
            fresh = CausalTransformer(impl.observation_shape[0], impl.action_size, cfg.context_size, cfg.transformer)
            net.load_state_dict(fresh.state_dict())
            token.fitted.fill_(False)  # its tokens came from the old training data
            flags.mark("transformer", False)
            flags.transformer_steps.zero_()
            self._set_trainer(m, None, None, None)

    def _fit_transformer(self, aug: AugmentationResult, n_steps: int, n_steps_per_epoch: int, logger,
                         show_progress: bool, eval_env, eval_episodes: int, save_interval: int, callback,
                         checkpoint_dir: Optional[str] = None, checkpoint_every: int = 1000,
                         resume: bool = False, member: int = 0) -> dict:
        """Trains member ``member``'s transformer (and fits its token model) for ``n_steps`` under its own seed."""
        impl, cfg, tcfg = self._impl, self._config, self._config.transformer
        net, token, flags = impl.member(member)
        if member and not flags.is_done("transformer") and int(flags.transformer_steps) == 0:
            self._reset_transformer(member)  # a member's training starts from initial weights drawn under its seed
        seed = self._member_seed(member)
        traj = aug.trajectories
        dev = module_device(net)
        v_next = batched_values(impl.value, traj.next_observations)
        rtg = value_returns_to_go(traj, v_next, cfg.gamma, tcfg.rtg_relabel)
        if not flags.is_done("transformer"):  # input normalisation from the training data, fixed after
            with torch.no_grad():
                real = ~traj.imagined
                net.obs_mean.copy_(torch.from_numpy(traj.observations[real].mean(0)))
                net.obs_std.copy_(torch.from_numpy(traj.observations[real].std(0) + 1e-6))
                net.rtg_scale.fill_(float(np.abs(rtg[real]).mean() + 1e-6))
        # A fresh policy gets a fresh token model: it must learn this fit's tokens (relabel, expectile, training
        # rows). A token model left over from an earlier call, e.g. a ``fit(n_steps=0)`` under other settings, would
        # otherwise set g_t at inference. A continued fit keeps the one its policy was trained with.
        if tcfg.return_token == "upper" and (not bool(token.fitted) or not flags.is_done("transformer")):
            self.fit_return_token(aug, rtg=rtg, member=member)
        weights = (advantage_weights(impl.value, traj.observations, traj.actions, tcfg.advantage_weight)
                   if tcfg.advantage_weight > 0 else None)
        sampler = WindowSampler(traj, rtg, cfg.context_size, tcfg.imagined_ratio, aug.n_real_episodes,
                                seed=seed + int(flags.transformer_steps), weights=weights)
        optim, sched, ema = self._trainer(member)
        if optim is None:
            optim = torch.optim.AdamW(net.parameters(), lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(tcfg.warmup_steps, tcfg.lr_schedule,
                                                                       tcfg.n_steps))
        # weight average: a continued fit in this process trains on from the raw weights; a loaded model (which
        # holds the average) trains on from the average
        if tcfg.ema_decay > 0:
            same_net = ema is not None and ema.params[0] is next(net.parameters())
            if same_net and ema.swapped:  # the network holds the average the last fit left, unless loaded over since
                same_net = all(torch.equal(p.detach(), d) for p, d in zip(ema.params, ema.deployed))
                if same_net:
                    ema.swap()
            if not same_net:
                ema = WeightAverage(net, tcfg.ema_decay, tcfg.ema_warmup)
            ema.decay, ema.warmup = tcfg.ema_decay, tcfg.ema_warmup
        else:
            ema = None
        self._set_trainer(member, optim, sched, ema)
        # emulated bf16 would be slower than fp32; on a GPU the transformer trains in fp32
        use_bf16 = tcfg.bf16 and dev.type == "cpu" and native_cpu_bf16()
        torch.manual_seed(seed + 2 + int(flags.transformer_steps))
        step = 0  # steps done in this fit call
        state_name = "train_state.pt" if member == 0 else f"train_state_member{member}.pt"
        state_path = os.path.join(checkpoint_dir, state_name) if checkpoint_dir else None
        st = self._matching_train_state(state_path, n_steps, flags) if resume and state_path else None
        if st is not None:  # the optimiser, RNG and step of the same step as the model that was loaded
            if ema is not None and "raw_weights" in st:  # the saved model holds the average
                with torch.no_grad():
                    ema.average = [p.detach().clone() for p in ema.params]
                    for p, w in zip(ema.params, st["raw_weights"]):
                        p.copy_(w)
                ema.n_updates = st["ema_updates"]
            optim.load_state_dict(st["optim"])
            sched.load_state_dict(st["sched"])
            sampler.gen.set_state(st["sampler_rng"])
            torch.set_rng_state(st["torch_rng"])
            if "cuda_rng" in st and dev.type == "cuda":  # dropout draws from the GPU's generator there
                torch.cuda.set_rng_state(st["cuda_rng"], dev)
            step, self._grad_step = st["step"], st["grad_step"]
        net.train()
        last: dict = {}
        bar = tqdm(range(step, n_steps), desc="transformer", disable=not show_progress or n_steps == 0,
                   initial=step, total=n_steps)
        for _ in bar:
            obs, act, g, mask = (x.to(dev) for x in sampler.sample(tcfg.batch_size))  # sampled on CPU
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                pred = net(obs, act, g)
            loss, metrics = value_guided_loss(pred.float(), act, obs, mask, impl.value.q, tcfg.value_guidance)
            if not torch.isfinite(loss):  # before the update: the last good weights are kept
                raise FloatingPointError(f"transformer stage: loss became {float(loss)} at step {step}; "
                                         "lower transformer.learning_rate or value_guidance.")
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), tcfg.grad_clip)
            optim.step()
            sched.step()
            if ema is not None:
                ema.update()
            step += 1
            self._grad_step += 1
            flags.transformer_steps += 1
            metrics["loss"] = loss.item()
            last = metrics
            for k, v in metrics.items():
                logger.add_metric(k, v)
            if step % 20 == 0:
                bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items()})
            epoch = (step - 1) // n_steps_per_epoch + 1
            if callback:
                callback(self, epoch, step)
                if not net.training:  # a callback that made a policy (eval mode) must not end dropout for the rest
                    net.train()
            if step % n_steps_per_epoch == 0 or step == n_steps:  # end of an epoch
                flags.mark("transformer")
                if eval_env is not None:  # the member in training, alone
                    with self.deployed_weights():
                        score = evaluate_transformer_with_environment(
                            self.as_stateful_wrapper(members=[member]), eval_env, eval_episodes)
                    logger.add_metric("environment", score)
                    last["environment"] = score
                logger.commit(epoch, self._grad_step)
                if epoch % save_interval == 0:
                    with self.deployed_weights():
                        logger.save_model(self._grad_step, self)
            if state_path and (step % checkpoint_every == 0 or step == n_steps):
                state = {"step": step, "n_steps": n_steps, "grad_step": self._grad_step,
                         "transformer_steps": int(flags.transformer_steps),
                         "augment_key": int(impl.stages.augment_key), "optim": optim.state_dict(),
                         "sched": sched.state_dict(), "sampler_rng": sampler.gen.get_state(),
                         "torch_rng": torch.get_rng_state()}
                if dev.type == "cuda":
                    state["cuda_rng"] = torch.cuda.get_rng_state(dev)
                if ema is not None:  # the checkpointed model holds the average; resuming needs the raw weights
                    state["raw_weights"] = [p.detach().clone() for p in ema.params]
                    state["ema_updates"] = ema.n_updates
                # the state first, the model second, the previous state kept: a kill at any point leaves a state
                # of the same step as the model on disk, which resume picks (_matching_train_state)
                if os.path.exists(state_path):
                    os.replace(state_path, state_path + ".prev")
                _atomic_torch_save(state, state_path)
                with self.deployed_weights():
                    self._save_checkpoint(checkpoint_dir)
        net.eval()
        if ema is not None:
            ema.swap()  # from here on the model holds the averaged weights (predict, save, export)
            ema.deployed = [p.detach().clone() for p in ema.params]  # to tell if weights are loaded over them
        return last

    @contextlib.contextmanager
    def deployed_weights(self):
        """Inside this block, while the transformer is training, the network holds the weights that ``fit`` will
        deploy (the weight average when ``transformer.ema_decay > 0``) in eval mode; on exit training goes on from
        the raw weights. For evaluations from a ``fit`` callback; outside training it only switches to eval mode.
        With several members, every member's network."""
        impl = self._impl
        nets = [impl.member(m)[0] for m in range(impl.n_members)]
        was_training = [net.training for net in nets]
        emas = [self._trainer(m)[2] for m in range(impl.n_members)]
        swapped = [ema for ema in emas if ema is not None and not ema.swapped]
        for ema in swapped:
            ema.swap()
        for net in nets:
            net.eval()
        try:
            yield self
        finally:
            for ema in swapped:
                ema.swap()
            for net, mode in zip(nets, was_training):
                net.train(mode)

    def last_iterate_weights(self) -> Optional[list]:
        """Copies of the transformer's raw parameters at the last training step (``net.parameters()`` order) while the
        network holds the weight average ``fit`` deploys; ``None`` without a weight average (the network then holds
        the last iterate itself). For diagnostics that deploy the last iterate beside the average."""
        ema = getattr(self, "_weight_average", None)
        if ema is None:
            return None
        return [w.detach().clone() for w in (ema.average if ema.swapped else ema.params)]

    # ----- checkpoints ---------------------------------------------------------------------
    def _matching_train_state(self, state_path: str, n_steps: int, flags: StageFlags) -> Optional[dict]:
        """The saved optimiser/RNG state (of the member whose flags are ``flags``) written at the same transformer
        step as the loaded model, if any."""
        impl = self._impl
        for path in (state_path, state_path + ".prev"):
            if not os.path.exists(path):
                continue
            st = torch.load(path, weights_only=False)
            if (st["n_steps"] == n_steps and st["augment_key"] == int(impl.stages.augment_key)
                    and st.get("transformer_steps", int(flags.transformer_steps)) == int(flags.transformer_steps)):
                return st
        return None

    def _save_checkpoint(self, checkpoint_dir: Optional[str], augmentation: bool = False) -> None:
        """Model (and, after augmentation, the augmented data) written atomically: never a half file."""
        if not checkpoint_dir:
            return
        os.makedirs(checkpoint_dir, exist_ok=True)
        path = os.path.join(checkpoint_dir, "ipd.d3")
        self.save(path + ".tmp")
        os.replace(path + ".tmp", path)
        if augmentation and self.augmentation is not None:
            self.augmentation.save(os.path.join(checkpoint_dir, "augmentation.npz"))
            _atomic_write_text(os.path.join(checkpoint_dir, "augmentation.key"), self._augmentation_key or "")

    def _load_checkpoint(self, checkpoint_dir: str) -> None:
        """Restores the model, augmentation and stage flags a previous fit saved (nothing if there is none)."""
        import io

        path = os.path.join(checkpoint_dir, "ipd.d3")
        if not os.path.exists(path):
            return
        saved = load_ipd(path)
        if self._impl is None:
            self.create_impl(saved.impl.observation_shape, saved.impl.action_size)
        buf = io.BytesIO()
        saved.impl.save_model(buf)
        self._impl.load_model(io.BytesIO(buf.getvalue()))
        aug_path = os.path.join(checkpoint_dir, "augmentation.npz")
        key_path = os.path.join(checkpoint_dir, "augmentation.key")
        if os.path.exists(aug_path) and os.path.exists(key_path):
            self.augmentation = AugmentationResult.load(aug_path)
            with open(key_path) as f:
                self._augmentation_key = f.read()

    # ----- checks --------------------------------------------------------------------------
    def _check_data(self, traj: Trajectories) -> None:
        """What fit and augment check before any computation: the data itself, and that it fits a built model."""
        traj.validate()
        self._check_actions(traj)
        impl = self._impl
        if impl is not None and (tuple(impl.observation_shape) != (traj.observation_dim,)
                                 or impl.action_size != traj.action_dim):
            raise DatasetError(
                f"This model was built for observations {tuple(impl.observation_shape)} and {impl.action_size} "
                f"actions; the dataset has ({traj.observation_dim},) and {traj.action_dim}."
            )

    @staticmethod
    def _check_actions(traj: Trajectories) -> None:
        amax = float(np.abs(traj.actions).max())
        if amax > 1.0 + 1e-4:
            raise DatasetError(
                f"Actions reach |a| = {amax:.3g}, but IPD's policy is tanh-bounded to [-1, 1]. Rescale actions to "
                "[-1, 1] (e.g. wrap the env with gymnasium.wrappers.RescaleAction(env, -1, 1) when collecting)."
            )

    def _check_env(self, env: Any, traj: Trajectories) -> None:
        import gymnasium

        if not isinstance(env.action_space, gymnasium.spaces.Box):
            raise DatasetError(f"eval_env has action space {env.action_space}; IPD needs a Box action space.")
        if env.observation_space.shape != (traj.observation_dim,) or env.action_space.shape != (traj.action_dim,):
            raise DatasetError(
                f"eval_env spaces (obs {env.observation_space.shape}, act {env.action_space.shape}) do not match "
                f"the dataset (obs ({traj.observation_dim},), act ({traj.action_dim},)): wrong environment?"
            )
        check_unit_box(env.action_space, "eval_env")

    # ----- inference -----------------------------------------------------------------------
    def predict(self, x: Union[TransformerInput, np.ndarray]) -> np.ndarray:  # type: ignore[override]
        """Actions for a batch of observations [B, obs] (one-step context, g = the return token of s), or
        d3rlpy's ``TransformerInput`` (action for the last step of that context)."""
        if self._impl is None:
            raise RuntimeError("The model is not built: call fit() or d3rlpy.load_learnable() first.")
        if isinstance(x, TransformerInput):
            self._impl.modules.set_eval()
            return super().predict(x)
        obs = np.asarray(x, dtype=np.float32)
        dim = self._impl.observation_shape[0]
        if obs.ndim != 2 or obs.shape[1] != dim:
            raise ValueError(f"predict expects observations shaped (batch, {dim}); got {obs.shape}. "
                             "For a single observation use obs[None].")
        if not np.isfinite(obs).all():
            raise ValueError("predict got NaN/inf observations.")
        self._impl.modules.set_eval()  # no dropout at inference (also after d3rlpy.load_learnable)
        impl = self._impl
        with torch.no_grad():
            dev = module_device(impl.transformer)
            o = torch.from_numpy(obs).unsqueeze(1).to(dev)
            a = torch.zeros(len(obs), 1, impl.action_size, device=dev)
            acts = [impl.member(m)[0](o, a, self.return_token(o, m))[:, 0] for m in range(impl.n_members)]
            return median_action(acts).cpu().numpy()

    def return_token_module(self, member: int = 0) -> nn.Module:
        """The module that sets member ``member``'s g_t at inference: V(s) (``return_token="value"``) or its fitted
        token model."""
        impl = self._impl
        mode = self._config.transformer.return_token
        if mode == "value":
            return ValueToken(impl.value)
        if mode == "upper":
            token = impl.member(member)[1]
            if not bool(token.fitted):
                raise RuntimeError("transformer.return_token='upper' but the token model is not fitted (the model "
                                   "was trained with 'value', or fit() was stopped before this member "
                                   f"({member}) trained): call fit() again, or set return_token='value'.")
            return token
        raise ValueError(f"unknown transformer.return_token {mode!r}: use 'value' or 'upper'")

    @torch.no_grad()
    def return_token(self, obs: torch.Tensor, member: int = 0) -> torch.Tensor:
        """Member ``member``'s g_t for observations [..., obs_dim] -> [...], as used by every inference path."""
        return self.return_token_module(member)(obs)

    def as_stateful_wrapper(self, target_return: Optional[float] = None, action_sampler: Any = None,
                            rtg_mode: Optional[str] = None,
                            members: Optional[list] = None) -> StatefulIPDWrapper:  # type: ignore[override]
        """Stateful policy for d3rlpy's evaluators. No target needed: g_t comes from the state
        (``transformer.return_token``) unless ``rtg_mode='target'``. ``members``: deploy only these of
        ``transformer.n_members`` (default: all, the median of their actions)."""
        mode = rtg_mode or ("value" if target_return is None else "target")
        return StatefulIPDWrapper(self, mode, target_return, members)

    def save_policy(self, fname: str) -> None:
        """Exports the deployable policy (transformer + the value network that sets the return token).

        ``.pt`` gives TorchScript, ``.onnx`` gives ONNX. The exported function takes the current context,
        ``observations [T, obs]`` and ``actions [T, act]`` (T <= context_size, the last action row is ignored),
        and returns the action for the last step; it needs neither d3rlpy nor ipd_agent.
        """
        if self._impl is None:
            raise RuntimeError("The model is not built: call fit() or d3rlpy.load_learnable() first.")
        if self._config.transformer.token_ratchet:  # before any file is written
            raise ValueError("save_policy exports one step as a function of the context window, but "
                             "transformer.token_ratchet needs the whole episode's tokens. Set "
                             "algo.config.transformer.token_ratchet = False to export (the token is then g(s_t)), "
                             "or deploy with IPDPolicy / as_stateful_wrapper, which keep the episode's state.")
        from .policy import ExportablePolicy

        members = range(self._impl.n_members)
        module = ExportablePolicy([self._impl.member(m)[0] for m in members],
                                  [self.return_token_module(m) for m in members]).eval()
        if module_device(module).type != "cpu":  # the exported file runs anywhere: trace a CPU copy
            module = copy.deepcopy(module).cpu()
        k, o, a = self._config.context_size, self._impl.observation_shape[0], self._impl.action_size
        dummy = (torch.randn(k, o), torch.zeros(k, a))
        with torch.no_grad():
            if fname.endswith(".pt"):
                torch.jit.trace(module, dummy, check_trace=False).save(fname)
            elif fname.endswith(".onnx"):
                torch.onnx.export(module, dummy, fname, input_names=["observations", "actions"],
                                  output_names=["action"], dynamic_axes={"observations": {0: "T"}, "actions": {0: "T"}},
                                  opset_version=17, dynamo=False)
            else:
                raise ValueError(f"save_policy: unknown export format for {fname!r}; use .pt (TorchScript) or .onnx")

    def as_policy(self, action_space: Any = None) -> IPDPolicy:
        """Stable-Baselines3-style policy: ``predict(obs, state, episode_start, deterministic)``."""
        return IPDPolicy(self, action_space)


register_learnable(IPDConfig)


class ValueToken(nn.Module):
    """g = V(s) as a module (DESIGN §2.6), so export traces the same code path as the token model."""

    def __init__(self, value: ValueFunctions) -> None:
        super().__init__()
        self.value = value

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.value.v(obs)


def load_ipd(path: str, device: DeviceArg = None) -> IPD:
    """``d3rlpy.load_learnable`` with a clear error for files that are not IPD models or are damaged."""
    try:
        algo = d3rlpy.load_learnable(path, device=device)
    except Exception as exc:  # noqa: BLE001 - re-raised with what to do
        raise ValueError(f"Could not load an IPD model from {path!r}: {type(exc).__name__}: {exc}. The file is "
                         "truncated, corrupt, or was written by an incompatible version; re-save it with IPD.save.") from exc
    if not isinstance(algo, IPD):
        raise ValueError(f"{path!r} holds a {type(algo).__name__}, not an IPD model.")
    return algo


def _atomic_torch_save(obj: Any, path: str) -> None:
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def _atomic_write_text(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
