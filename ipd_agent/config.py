"""Configuration of every IPD stage.

Each stage of IPD has its own documented sub-config; ``IPDConfig`` (in ``algo.py``) nests them.
All of them are d3rlpy ``SerializableConfig`` dataclasses, so the whole algorithm round-trips
through JSON and ``d3rlpy.load_learnable``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from d3rlpy.serializable_config import SerializableConfig

__all__ = ["ValueConfig", "WorldModelConfig", "PlannerConfig", "AugmentConfig", "TransformerNetConfig"]


@dataclasses.dataclass()
class ValueConfig(SerializableConfig):
    """Stage 1: the quasi-optimal value function, trained with d3rlpy's IQL (DESIGN §2.1)."""

    n_steps: int = 50_000  # IQL gradient steps (paper-scale: 1M; CPU profile keeps it cheap)
    batch_size: int = 256  # IQL mini-batch, d3rlpy default
    expectile: float = 0.7  # IQL expectile for V; 0.7 is IQL's locomotion setting
    weight_temp: float = 3.0  # IQL advantage temperature for the policy used as MPC warm start
    tau: float = 0.005  # IQL target-network update rate; larger propagates values faster on short CPU budgets
    reward_multiplier: float = 1000.0  # d3rlpy's ReturnBasedRewardScaler multiplier (IQL locomotion recipe)
    hidden_units: tuple = (256, 256)  # MLP width of V, Q and the IQL policy


@dataclasses.dataclass()
class WorldModelConfig(SerializableConfig):
    """Stage 2: probabilistic ensemble dynamics model (DESIGN §2.2)."""

    n_members: int = 7  # ensemble size E
    n_elites: int = 5  # members kept by held-out error
    hidden_size: int = 200  # width of each hidden layer
    n_layers: int = 4  # number of hidden layers
    learning_rate: float = 1e-3  # Adam learning rate
    weight_decay: float = 1e-5  # L2 on weights keeps members smooth off-data
    batch_size: int = 256  # per-member mini-batch
    max_steps: int = 20_000  # hard cap on gradient steps
    eval_every: int = 500  # steps between held-out evaluations (early stopping)
    patience: int = 6  # evaluations without improvement before stopping
    holdout_ratio: float = 0.1  # share of transitions held out for early stopping and elites
    max_holdout: int = 5000  # cap on held-out transitions (keeps evaluation cheap)
    logvar_bound_coef: float = 0.01  # weight of the learnable log-variance bound penalty (PETS)
    uncertainty: str = "gjs"  # "gjs": geometric Jensen-Shannon between elites; "disagreement": MOPO-style
    threshold_quantile: float = 0.95  # kappa = this quantile of U over dataset (s, a)
    threshold_samples: int = 50_000  # dataset pairs used to estimate kappa


@dataclasses.dataclass()
class PlannerConfig(SerializableConfig):
    """Stage 4: MPPI inside the world model (DESIGN §2.4)."""

    n_samples: int = 64  # candidate action sequences per branch state (N)
    horizon: int = 5  # planning horizon H
    n_iterations: int = 3  # MPPI refinement iterations
    temperature: float = 0.5  # softmax temperature on standardised candidate scores
    noise_std: float = 0.3  # exploration noise around the warm-start mean (actions are in [-1, 1])
    greedy: bool = False  # ablation: execute the IQL policy instead of MPC ("greedy augmentation")
    # which plan's first action is executed: "best" = the highest-scoring sampled candidate; "mean" = MPPI's
    # score-weighted mean of the last iteration's candidates (smoother actions, less of the sampling noise that the
    # transformer then imitates). Either way the warm start is kept where it scores higher
    execute: str = "best"
    bf16: bool = True  # score candidates in bf16 where the CPU has native bf16 (~2x; executed steps stay fp32)


@dataclasses.dataclass()
class AugmentConfig(SerializableConfig):
    """Stages 3-5: branch-point selection, imaginary rollouts, splicing and acceptance (DESIGN §2.3-2.4)."""

    enabled: bool = True  # False: the "no augmentation" ablation (transformer sees real data only)
    segment_length: int = 20  # L: steps compared when choosing branch points and max rollout length
    branch_fraction: float = 0.2  # top share of dataset states by value gap considered as branch points
    n_branches: int = 2000  # cap on branch points (scales imagined data volume)
    accept_margin: float = 0.0  # imagined segment must beat the real one by more than this
    min_rollout_length: int = 1  # shorter imagined segments are rejected
    chunk_size: int = 512  # branch states planned together (bounds memory)


@dataclasses.dataclass()
class TransformerNetConfig(SerializableConfig):
    """Stage 6: the value-guided causal transformer policy (DESIGN §2.5)."""

    n_steps: int = 20_000  # transformer gradient steps
    batch_size: int = 64  # trajectory windows per batch (d3rlpy DT default)
    hidden_size: int = 128  # token embedding width
    n_layers: int = 3  # transformer blocks
    n_heads: int = 1  # attention heads (d3rlpy DT default)
    tokens_per_step: int = 2  # 2: (g+s), a -- a third fewer tokens than DT's 3: g, s, a (same information)
    dropout: float = 0.1  # dropout on embeddings, attention and residuals
    learning_rate: float = 1e-4  # AdamW learning rate (d3rlpy DT default)
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup_steps: int = 1000  # linear learning-rate warm-up
    # after the warm-up: "constant" keeps learning_rate; "cosine" decays it along a half cosine to 0 at n_steps, so
    # the last iterates barely move (on the CPU benchmark it did not steady hopper's scores: PROFILE_HISTORY.md)
    lr_schedule: str = "constant"
    grad_clip: float = 0.25  # gradient norm clip (DT recipe)
    # exponential moving average of the weights, used for evaluation and deployment; 0 deploys the last iterate.
    # Warmed up as min(ema_decay, (1 + n) / (10 + n)) after n steps, so it spans at most about the last n / 9 steps
    ema_decay: float = 0.0
    # "capped": the warm-up above (the CPU profile's); "bias_corrected": every iterate weighted ema_decay^age and
    # normalised (Adam's correction), so the average spans about 1 / (1 - ema_decay) steps once n exceeds that
    ema_warmup: str = "capped"
    value_guidance: float = 1.0  # alpha: weight of the -Q(s, pi)/mean|Q| term; 0 disables it
    # beta: weight each action's imitation error by min(exp(beta * A(s, a)), 100), A = Q - V of stage 1 on IQL's own
    # reward scale (IQL's actor uses beta = value.weight_temp = 3), so where the data mixes good and bad actions for
    # one token the better ones are copied more; the batch loss stays a weighted mean. 0: every action counts alike
    advantage_weight: float = 0.0
    # return tokens: "max" = QDT relabel r + γ·max(g', V(s')); "mc" = plain r + γ·g'; "one_step" = r + γ·V(s')
    rtg_relabel: str = "max"
    return_token: str = "upper"  # inference token: "upper" = token model below; "value" = V(s) (DESIGN §2.6, ablation)
    token_expectile: float = 0.9  # "upper": expectile of the training tokens given s that the token model fits
    token_steps: int = 3000  # "upper": gradient steps of the token model (a 2x256 MLP, seconds on CPU)
    # "upper": deploy max(g(s), this quantile of g(s) over the data's states), so the token never asks for less than
    # the data's better states can earn; None keeps g(s). Set when the token model is fitted, saved with it
    token_floor: Optional[float] = None
    # "upper": deploy the running maximum of g(s) within each episode, so the ask never drops below what the policy
    # already asked for (hopper medium-replay: g(s) falls from ~300 to ~110 just before the falls it then copies);
    # unlike the floor, the first steps keep g(s_0). Inference only; stateful, so not in ``save_policy`` exports
    token_ratchet: bool = False
    imagined_ratio: float = 0.5  # share of each batch drawn from imagined episodes (when any exist)
    # policies trained on the same data, member m under seed + 1000 m (initial weights, batches, dropout, token
    # model), deployed together: each keeps its own return tokens and the executed action is the element-wise median
    # of theirs. On hopper one member's score swings by ~24 points with its seed and the median outvotes a member about
    # to fall (PROFILE_HISTORY.md: +19.4 ± 3.6 over one member). Costs n_members transformer trainings; 1: one policy
    n_members: int = 1
    bf16: bool = True  # bf16 autocast in training where the CPU has native bf16 (AVX512-BF16/AMX); fp32 elsewhere


def native_cpu_bf16() -> bool:
    """True where bf16 matmuls run natively on this CPU (measured 1.2-1.6x faster training, same held-out error:
    ``python benchmarks/speed.py``)."""
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(torch.backends.mkldnn.is_available() and
                    (cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported()))
    except AttributeError:  # older torch without the probes
        return False
