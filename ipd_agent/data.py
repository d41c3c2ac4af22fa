"""Datasets in, datasets out: one flat episode table that every IPD stage reads.

``Trajectories`` stores episodes back to back (flat arrays plus episode offsets) so that every
stage can work on whole arrays instead of looping over episodes. It is built from a d3rlpy
``ReplayBuffer``/``MDPDataset``, a Minari dataset (object, id or local path) or plain arrays, and is
checked once, up front, so bad data fails before any training starts.

Minari stores T+1 observations per episode; d3rlpy 2.8.1's ``get_minari`` drops the first one
instead of the last. We convert ourselves: ``observations[:-1]`` are the states, ``observations[1:]``
the next states.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Union

import numpy as np

__all__ = ["Trajectories", "DatasetError", "check_unit_box", "to_trajectories", "load_minari", "reference_scores"]


class DatasetError(ValueError):
    """The dataset cannot be used by IPD; the message says why and how to fix it."""


def check_unit_box(action_space, what: str = "the environment") -> None:
    """Policies here act in [-1, 1] (the data's scale): another Box would get wrongly scaled actions, silently."""
    low, high = np.asarray(action_space.low, np.float64), np.asarray(action_space.high, np.float64)
    if not (np.allclose(low, -1.0) and np.allclose(high, 1.0)):
        raise DatasetError(
            f"{what} has action bounds [{low.min():g}, {high.max():g}], but the policy acts in [-1, 1] like the "
            "data. Wrap the env: gymnasium.wrappers.RescaleAction(env, -1.0, 1.0) (as `ipd-agent make-dataset` "
            "does when it records data)."
        )


@dataclasses.dataclass
class Trajectories:
    """Episodes stored back to back.

    Row ``i`` is one transition ``(s_i, a_i, r_i, s'_i)``; episode ``e`` spans rows
    ``episode_starts[e]:episode_starts[e + 1]``. ``terminals[i]`` is a true environment termination
    (only ever on an episode's last row); an episode whose last row is not terminal was truncated.
    ``imagined`` and ``branch_ids`` record provenance after augmentation (real rows: False / -1).
    ``next_known`` is False on the rows whose next state the source did not store (the last row of each episode
    of a d3rlpy dataset, which keeps T observations for T actions): their ``next_observations`` repeat the state
    to keep the table rectangular, and the world model does not learn from them.
    """

    observations: np.ndarray  # [N, obs_dim] float32
    actions: np.ndarray  # [N, act_dim] float32
    rewards: np.ndarray  # [N] float32
    next_observations: np.ndarray  # [N, obs_dim] float32
    terminals: np.ndarray  # [N] bool
    episode_starts: np.ndarray  # [n_episodes + 1] int64 offsets, first 0, last N
    imagined: Optional[np.ndarray] = None  # [N] bool, True for model-generated rows
    branch_ids: Optional[np.ndarray] = None  # [N] int64, index of the branch point a row came from, -1 if none
    next_known: Optional[np.ndarray] = None  # [N] bool, False where the next state is a placeholder

    def __post_init__(self) -> None:
        # one dtype everywhere, so float64 input cannot reach torch and fail late
        for name in ("observations", "actions", "rewards", "next_observations"):
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=np.float32))
        self.terminals = np.asarray(self.terminals, dtype=bool)
        self.episode_starts = np.asarray(self.episode_starts, dtype=np.int64)
        n = len(self.observations)
        if self.imagined is None:
            self.imagined = np.zeros(n, dtype=bool)
        if self.branch_ids is None:
            self.branch_ids = np.full(n, -1, dtype=np.int64)
        self.next_known = np.ones(n, dtype=bool) if self.next_known is None else np.asarray(self.next_known, bool)

    # ----- shape helpers -------------------------------------------------------------------
    @property
    def n_transitions(self) -> int:
        return int(len(self.observations))

    @property
    def n_episodes(self) -> int:
        return int(len(self.episode_starts) - 1)

    @property
    def observation_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(self.episode_starts)

    @property
    def episode_ids(self) -> np.ndarray:
        """Episode index of every row."""
        return np.repeat(np.arange(self.n_episodes), self.episode_lengths)

    @property
    def episode_ends(self) -> np.ndarray:
        """Bool per row: last row of its episode."""
        ends = np.zeros(self.n_transitions, dtype=bool)
        ends[self.episode_starts[1:] - 1] = True
        return ends

    def fingerprint(self) -> str:
        """SHA-1 of the data, so cached results are reused only for exactly the same dataset."""
        import hashlib

        h = hashlib.sha1()
        for name in ("observations", "actions", "rewards", "next_observations", "terminals", "episode_starts"):
            h.update(np.ascontiguousarray(getattr(self, name)).tobytes())
        if not self.next_known.all():  # hashed only when present, so fully known data keeps its earlier key
            h.update(self.next_known.tobytes())
        return h.hexdigest()

    def episode_returns(self) -> np.ndarray:
        return np.add.reduceat(self.rewards.astype(np.float64), self.episode_starts[:-1])

    def episode(self, index: int) -> dict[str, np.ndarray]:
        s, e = self.episode_starts[index], self.episode_starts[index + 1]
        return {f.name: getattr(self, f.name)[s:e] for f in dataclasses.fields(self) if f.name != "episode_starts"}

    # ----- construction --------------------------------------------------------------------
    @classmethod
    def from_episodes(cls, episodes: list[dict[str, np.ndarray]]) -> "Trajectories":
        """Builds from a list of dicts with keys observations [T+1 or T], actions, rewards, terminated."""
        if len(episodes) == 0:
            raise DatasetError("The dataset has no episodes. Pass a dataset with at least one episode of >= 2 steps.")
        obs, nxt, act, rew, term, known, lengths = [], [], [], [], [], [], []
        for ep in episodes:
            o = np.asarray(ep["observations"], dtype=np.float32)
            a = np.asarray(ep["actions"], dtype=np.float32)
            r = np.asarray(ep["rewards"], dtype=np.float32).reshape(-1)
            t = len(a)
            if t == 0:
                raise DatasetError(f"Episode {len(lengths)} has no steps. Drop empty episodes before calling fit.")
            if len(r) != t:
                raise DatasetError(f"Episode {len(lengths)} has {len(r)} rewards for {t} actions; they must match.")
            if a.ndim == 1:
                a = a.reshape(t, -1)
            k = np.ones(t, dtype=bool)
            if len(o) == t + 1:  # Minari layout: final next observation included
                o_now, o_next = o[:-1], o[1:]
            elif len(o) == t:  # d3rlpy layout: the last next state is unknown; a placeholder, marked as such
                o_now, o_next = o, np.concatenate([o[1:], o[-1:]], axis=0)
                k[-1] = False
            else:
                raise DatasetError(
                    f"An episode has {len(o)} observations for {t} actions; expected {t} or {t + 1}."
                )
            te = np.zeros(t, dtype=bool)
            te[-1] = bool(ep["terminated"])
            obs.append(o_now.reshape(t, -1))
            nxt.append(o_next.reshape(t, -1))
            act.append(a)
            rew.append(r)
            term.append(te)
            known.append(k)
            lengths.append(t)
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(
            observations=np.concatenate(obs),
            actions=np.concatenate(act),
            rewards=np.concatenate(rew),
            next_observations=np.concatenate(nxt),
            terminals=np.concatenate(term),
            episode_starts=starts,
            next_known=np.concatenate(known),
        )

    @classmethod
    def concatenate(cls, parts: list["Trajectories"]) -> "Trajectories":
        parts = [p for p in parts if p.n_episodes > 0]
        offsets = np.cumsum([0] + [p.n_transitions for p in parts])
        starts = np.concatenate([[0]] + [p.episode_starts[1:] + off for p, off in zip(parts, offsets[:-1])])
        fields = {}
        for f in dataclasses.fields(cls):
            if f.name == "episode_starts":
                continue
            fields[f.name] = np.concatenate([getattr(p, f.name) for p in parts])
        return cls(episode_starts=starts.astype(np.int64), **fields)

    # ----- checks --------------------------------------------------------------------------
    def validate(self, min_episode_length: int = 2) -> None:
        """Raises DatasetError naming the first problem found, before any training starts."""
        if self.n_transitions == 0 or self.n_episodes == 0:
            raise DatasetError("The dataset is empty (0 transitions). Pass a dataset with at least one episode.")
        n = len(self.observations)
        for name in ("actions", "rewards", "next_observations", "terminals", "next_known"):
            if len(getattr(self, name)) != n:
                raise DatasetError(f"{name} has {len(getattr(self, name))} rows but observations has {n}; every "
                                   "per-transition array needs one row per transition.")
        if self.next_observations.shape[1:] != self.observations.shape[1:]:
            raise DatasetError(f"next_observations are shaped {self.next_observations.shape[1:]} per row but "
                               f"observations {self.observations.shape[1:]}; they must match.")
        st = np.asarray(self.episode_starts)
        if st.ndim != 1 or len(st) < 2 or st[0] != 0 or st[-1] != n or np.any(np.diff(st) <= 0):
            raise DatasetError(f"episode_starts must rise strictly from 0 to the number of transitions ({n}), one "
                               f"entry per episode plus the end; got {st[:5].tolist()}...{st[-2:].tolist()}.")
        inner = np.flatnonzero(self.terminals.astype(bool) & ~self.episode_ends)
        if len(inner):
            ep = int(np.searchsorted(st, inner[0], side="right") - 1)
            raise DatasetError(f"{len(inner)} terminal flag(s) fall inside episodes (first: transition {inner[0]}, "
                               f"episode {ep}). A terminal ends its episode: split the episodes there, or fix the "
                               "flags.")
        for name in ("observations", "actions", "rewards", "next_observations"):
            arr = getattr(self, name)
            bad = ~np.isfinite(arr)
            if bad.any():
                row = int(np.argwhere(bad.reshape(len(arr), -1).any(axis=1))[0, 0])
                ep = int(np.searchsorted(self.episode_starts, row, side="right") - 1)
                raise DatasetError(
                    f"{name} contains {int(bad.sum())} NaN/inf values (first at transition {row}, episode {ep}, "
                    f"step {row - self.episode_starts[ep]}). Clean or drop those episodes before calling fit."
                )
        short = np.flatnonzero(self.episode_lengths < min_episode_length)
        if len(short):
            raise DatasetError(
                f"{len(short)} episode(s) have fewer than {min_episode_length} steps (first: episode {short[0]}, "
                f"length {self.episode_lengths[short[0]]}). Drop them: a transformer context needs at least "
                f"{min_episode_length} steps."
            )
        if self.actions.ndim != 2 or self.observations.ndim != 2:
            raise DatasetError("Observations and actions must be flat vectors (Box spaces).")

    # ----- export --------------------------------------------------------------------------
    def to_d3rlpy(self):
        """A d3rlpy MDPDataset holding the same episodes (used for d3rlpy's IQL and for baselines)."""
        import d3rlpy

        ends = self.episode_ends
        terminals = self.terminals.astype(np.float32)
        timeouts = (ends & ~self.terminals).astype(np.float32)
        return d3rlpy.dataset.MDPDataset(
            observations=self.observations,
            actions=self.actions,
            rewards=self.rewards.reshape(-1, 1),
            terminals=terminals,
            timeouts=timeouts,
            action_space=d3rlpy.ActionSpace.CONTINUOUS,
            action_size=self.action_dim,
        )

    def to_minari(self, dataset_id: str, env: Any = None, **metadata: Any):
        """Writes these episodes as a local Minari dataset (imagined rows included, provenance in infos)."""
        import minari
        from minari.data_collector.episode_buffer import EpisodeBuffer

        eps = []
        for e in range(self.n_episodes):
            d = self.episode(e)
            obs = np.concatenate([d["observations"], d["next_observations"][-1:]], axis=0)
            term = d["terminals"].copy()
            trunc = np.zeros_like(term)
            trunc[-1] = not term[-1]
            eps.append(
                EpisodeBuffer(
                    id=e,
                    observations=obs,
                    actions=d["actions"],
                    rewards=list(d["rewards"].astype(np.float64)),
                    terminations=list(term),
                    truncations=list(trunc),
                    # next_known travels too: a placeholder final observation must not become a real one on load
                    infos={"imagined": d["imagined"], "branch_id": d["branch_ids"], "next_known": d["next_known"]},
                )
            )
        if env is None:  # no environment: describe the spaces from the data (IPD's actions are in [-1, 1])
            import gymnasium

            metadata.setdefault("observation_space", gymnasium.spaces.Box(-np.inf, np.inf, (self.observation_dim,),
                                                                          np.float32))
            metadata.setdefault("action_space", gymnasium.spaces.Box(-1.0, 1.0, (self.action_dim,), np.float32))
        return minari.create_dataset_from_buffers(dataset_id=dataset_id, buffer=eps, env=env, **metadata)


DatasetLike = Union["Trajectories", Any, str, os.PathLike]


def open_minari(dataset: Any):
    """The Minari dataset object of an id, a local path or an object, checked for what IPD and the harness need
    (continuous actions, flat observations) without reading its episodes: a DatasetError says what is wrong."""
    import gymnasium
    import minari

    if isinstance(dataset, (str, os.PathLike)):
        path = os.fspath(dataset)
        if os.path.isdir(path):  # a local dataset directory: point Minari at its root
            root, dataset_id = _split_minari_path(path)
            old = os.environ.get("MINARI_DATASETS_PATH")
            os.environ["MINARI_DATASETS_PATH"] = root
            try:
                dataset = minari.load_dataset(dataset_id)
            finally:
                if old is None:
                    os.environ.pop("MINARI_DATASETS_PATH", None)
                else:
                    os.environ["MINARI_DATASETS_PATH"] = old
        else:
            try:
                dataset = minari.load_dataset(path)
            except Exception as exc:  # noqa: BLE001 - re-raised with a fix
                raise DatasetError(
                    f"Could not load Minari dataset {path!r}: {exc}. Set MINARI_DATASETS_PATH to the folder that "
                    "holds it (e.g. ../shared/datasets) or pass the dataset's local directory."
                ) from exc
    if not isinstance(dataset.action_space, gymnasium.spaces.Box):
        raise DatasetError(
            f"IPD needs a continuous (Box) action space; this dataset has {dataset.action_space}. "
            "Use a discrete-action method such as d3rlpy's DiscreteCQL for it."
        )
    if not isinstance(dataset.observation_space, gymnasium.spaces.Box) or len(dataset.observation_space.shape) != 1:
        raise DatasetError(
            f"IPD supports flat Box observations; this dataset has {dataset.observation_space}. "
            "Dict and image observations are not supported: flatten them first."
        )
    return dataset


def load_minari(dataset: Any) -> tuple["Trajectories", dict]:
    """Converts a Minari dataset (object, id or local path) into Trajectories plus its metadata.

    Returns the trajectories and a dict with ``env_id``, ``ref_min_score``, ``ref_max_score``,
    ``observation_space`` and ``action_space`` where the dataset has them.
    """
    dataset = open_minari(dataset)
    episodes, known = [], []
    for ep in dataset.iterate_episodes():
        known.append(np.asarray(ep.infos["next_known"], bool) if "next_known" in (ep.infos or {}) else None)
        episodes.append(
            {
                "observations": ep.observations,
                "actions": ep.actions,
                "rewards": ep.rewards,
                "terminated": bool(np.asarray(ep.terminations)[-1]) if len(ep.rewards) else False,
            }
        )
    traj = Trajectories.from_episodes(episodes)
    if any(k is not None for k in known):  # written by Trajectories.to_minari from d3rlpy-layout data
        traj.next_known = np.concatenate([np.ones(len(e["actions"]), bool) if k is None else k
                                          for e, k in zip(episodes, known)])
    meta = {"observation_space": dataset.observation_space, "action_space": dataset.action_space}
    md = dataset.storage.metadata
    for k in ("ref_min_score", "ref_max_score", "dataset_id"):
        if k in md:
            meta[k] = md[k]
    try:
        meta["env_spec"] = dataset.spec.env_spec  # includes wrappers such as RescaleAction
        meta["env_id"] = dataset.spec.env_spec.id
    except Exception:  # noqa: BLE001 - datasets without an env spec are fine
        pass
    return traj, meta


def _split_minari_path(path: str) -> tuple[str, str]:
    """'/root/ns/name-v0' (or '/root/ns/name-v0/data') -> ('/root', 'ns/name-v0')."""
    path = os.path.abspath(path)
    if os.path.basename(path) == "data":
        path = os.path.dirname(path)
    parts = path.split(os.sep)
    # walk up until the folder above has no metadata/namespace file: that is the root
    for depth in range(1, len(parts)):
        root = os.sep.join(parts[:-depth]) or os.sep
        if not os.path.exists(os.path.join(root, "namespace_metadata.json")):
            return root, "/".join(parts[-depth:])
    raise DatasetError(f"{path} is not a Minari dataset directory.")


def to_trajectories(dataset: Any) -> tuple["Trajectories", dict]:
    """Accepts every input IPD supports and returns (Trajectories, metadata)."""
    import gymnasium
    from d3rlpy.dataset import ReplayBufferBase

    if isinstance(dataset, Trajectories):
        return dataset, {}
    if isinstance(dataset, (str, os.PathLike)) or type(dataset).__name__ == "MinariDataset":
        return load_minari(dataset)
    if isinstance(dataset, ReplayBufferBase):
        info = dataset.dataset_info
        if info.action_space != 1 and str(info.action_space).endswith("DISCRETE"):
            raise DatasetError(
                "IPD needs a continuous action space; this d3rlpy dataset is discrete. "
                "Use d3rlpy's DiscreteCQL/DiscreteDecisionTransformer for it."
            )
        if len(dataset.episodes) == 0:
            raise DatasetError("The dataset is empty (0 episodes).")
        shape = dataset.episodes[0].observation_signature.shape
        if len(shape) != 1 or len(shape[0]) != 1:
            raise DatasetError(
                f"IPD supports flat vector observations; this dataset's observation shapes are {shape}. "
                "Dict and image observations are not supported: flatten them first."
            )
        episodes = [
            {
                "observations": ep.observations,
                "actions": ep.actions,
                "rewards": ep.rewards,
                "terminated": bool(ep.terminated),
            }
            for ep in dataset.episodes
        ]
        return Trajectories.from_episodes(episodes), {}
    if isinstance(dataset, gymnasium.Env):
        raise DatasetError("fit() needs an offline dataset, not an environment.")
    raise DatasetError(
        f"Unsupported dataset type {type(dataset).__name__}. Pass a d3rlpy ReplayBuffer/MDPDataset, a Minari "
        "dataset, a Minari dataset id or local path, or ipd_agent.Trajectories."
    )


def reference_scores(meta: dict, env_id: Optional[str] = None) -> Optional[tuple[float, float]]:
    """(ref_min, ref_max) from dataset metadata, else D4RL's constants for known tasks."""
    if "ref_min_score" in meta and "ref_max_score" in meta:
        return float(meta["ref_min_score"]), float(meta["ref_max_score"])
    known = {
        "Hopper": (-20.272305, 3234.3),
        "HalfCheetah": (-280.178953, 12135.0),
        "Walker2d": (1.629008, 4592.3),
        "InvertedPendulum": (0.0, 1000.0),
    }
    env_id = env_id or meta.get("env_id")
    if env_id:
        for k, v in known.items():
            if env_id.startswith(k):
                return v
    return None


def normalized_score(ret: float, ref: Optional[tuple[float, float]]) -> float:
    """100 * (R - ref_min) / (ref_max - ref_min); NaN when no reference is known."""
    if ref is None:
        return float("nan")
    return 100.0 * (ret - ref[0]) / (ref[1] - ref[0])
