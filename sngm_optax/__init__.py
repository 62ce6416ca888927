"""sngm_optax: optax transforms for training at any batch size."""

from sngm_optax._accumulation import AccumulationState
from sngm_optax._accumulation import gradient_accumulator
from sngm_optax._accumulation import GradientAccumulator
from sngm_optax._adadagrad import adadagrad
from sngm_optax._adadagrad import adadagrad_norm
from sngm_optax._adagrad_norm import adagrad_norm
from sngm_optax._adagrad_norm import scale_by_adagrad_norm
from sngm_optax._adagrad_norm import ScaleByAdagradNormState
from sngm_optax._adaptive_batch_size import adaptive_batch_size
from sngm_optax._adaptive_batch_size import AdaptiveBatchSizeState
from sngm_optax._batch_size_tests import augmented_inner_product_test
from sngm_optax._batch_size_tests import coordinate_test
from sngm_optax._batch_size_tests import inner_product_test
from sngm_optax._batch_size_tests import next_batch_size
from sngm_optax._batch_size_tests import norm_test
from sngm_optax._batch_size_tests import orthogonality_test
from sngm_optax._dgc import dgc
from sngm_optax._dgc import scale_by_dgc
from sngm_optax._dgc import ScaleByDgcState
from sngm_optax._distributed import average_across_devices
from sngm_optax._distributed import per_device_state
from sngm_optax._gmc import gmc
from sngm_optax._gmc import scale_by_gmc
from sngm_optax._gmc import ScaleByGmcState
from sngm_optax._gradient_statistics import add_gradient_moments
from sngm_optax._gradient_statistics import gradient_moments
from sngm_optax._gradient_statistics import GradientMoments
from sngm_optax._gradient_statistics import GradientNoiseStatistics
from sngm_optax._gradient_statistics import microbatch_statistics
from sngm_optax._gradient_statistics import moment_statistics
from sngm_optax._gradient_statistics import per_device_statistics
from sngm_optax._gradient_statistics import per_example_statistics
from sngm_optax._noise_scale import noise_scale_monitor
from sngm_optax._noise_scale import NoiseScaleMonitorState
from sngm_optax._normalize import global_norm
from sngm_optax._normalize import normalize_by_global_norm
from sngm_optax._sngm import scale_by_sngm
from sngm_optax._sngm import sngm
from sngm_optax._top_k import num_selected
from sngm_optax._top_k import top_k_by_magnitude
from sngm_optax._trajectory import tr_adam
from sngm_optax._trajectory import tr_sgd
from sngm_optax._trajectory import trajectory_regularized
from sngm_optax._trajectory import TrajectoryRegularizedState

__version__ = "0.1.0"

__all__ = (
    "AccumulationState",
    "adadagrad",
    "adadagrad_norm",
    "adagrad_norm",
    "adaptive_batch_size",
    "AdaptiveBatchSizeState",
    "add_gradient_moments",
    "augmented_inner_product_test",
    "average_across_devices",
    "coordinate_test",
    "dgc",
    "global_norm",
    "gmc",
    "gradient_accumulator",
    "gradient_moments",
    "GradientAccumulator",
    "GradientMoments",
    "GradientNoiseStatistics",
    "inner_product_test",
    "microbatch_statistics",
    "moment_statistics",
    "next_batch_size",
    "noise_scale_monitor",
    "NoiseScaleMonitorState",
    "norm_test",
    "normalize_by_global_norm",
    "num_selected",
    "orthogonality_test",
    "per_device_state",
    "per_device_statistics",
    "per_example_statistics",
    "scale_by_adagrad_norm",
    "scale_by_dgc",
    "scale_by_gmc",
    "scale_by_sngm",
    "ScaleByAdagradNormState",
    "ScaleByDgcState",
    "ScaleByGmcState",
    "sngm",
    "top_k_by_magnitude",
    "tr_adam",
    "tr_sgd",
    "trajectory_regularized",
    "TrajectoryRegularizedState",
)
