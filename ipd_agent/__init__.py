"""ipd-agent: Imaginary Planning Distillation as a d3rlpy algorithm."""
import warnings as _warnings

_warnings.filterwarnings("ignore", message=".*Gym has been unmaintained.*")

from .algo import IPD, IPDConfig, load_ipd  # noqa: E402
from .augment import AugmentationResult, augment  # noqa: E402
from .config import AugmentConfig, PlannerConfig, TransformerNetConfig, ValueConfig, WorldModelConfig  # noqa: E402
from .data import DatasetError, Trajectories, load_minari, to_trajectories  # noqa: E402
from .planner import MPCPlanner  # noqa: E402
from .policy import IPDPolicy, StatefulIPDWrapper  # noqa: E402
from .world_model import WorldModel  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "IPD", "IPDConfig", "load_ipd", "AugmentationResult", "augment", "AugmentConfig", "PlannerConfig",
    "TransformerNetConfig", "ValueConfig", "WorldModelConfig", "DatasetError", "Trajectories", "load_minari",
    "to_trajectories", "MPCPlanner", "IPDPolicy", "StatefulIPDWrapper", "WorldModel",
]
