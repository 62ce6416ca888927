"""sngm_optax: optax transforms for training at any batch size."""

from sngm_optax.compression import dgc
from sngm_optax.compression import gmc
from sngm_optax.compression import num_selected
from sngm_optax.compression import scale_by_dgc
from sngm_optax.compression import scale_by_gmc
from sngm_optax.compression import ScaleByDgcState
from sngm_optax.compression import ScaleByGmcState
from sngm_optax.compression import top_k_by_magnitude
from sngm_optax.distributed import average_across_devices
from sngm_optax.distributed import per_device_state
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
    "dgc",
    "global_norm",
    "gmc",
    "normalize_by_global_norm",
    "num_selected",
    "per_device_state",
    "scale_by_dgc",
    "scale_by_gmc",
    "scale_by_sngm",
    "ScaleByDgcState",
    "ScaleByGmcState",
    "sngm",
    "top_k_by_magnitude",
    "tr_adam",
    "tr_sgd",
    "trajectory_regularized",
    "TrajectoryRegularizedState",
)
