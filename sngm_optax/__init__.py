"""sngm_optax: optax transforms for training at any batch size."""

from sngm_optax.distributed import average_across_devices
from sngm_optax.normalize import global_norm
from sngm_optax.normalize import normalize_by_global_norm
from sngm_optax.sngm import scale_by_sngm
from sngm_optax.sngm import sngm
from sngm_optax.trajectory import tr_adam
from sngm_optax.trajectory import tr_sgd
from sngm_optax.trajectory import trajectory_regularized
from sngm_optax.trajectory import TrajectoryRegularizedState

__version__ = "0.1.0"

__all__ = (
    "average_across_devices",
    "global_norm",
    "normalize_by_global_norm",
    "scale_by_sngm",
    "sngm",
    "tr_adam",
    "tr_sgd",
    "trajectory_regularized",
    "TrajectoryRegularizedState",
)
