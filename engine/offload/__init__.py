"""Offload: the only layer that knows both modules and storage - the training runtime.

* :class:`OffloadRuntime` (:mod:`.runtime`) - one training step, top to bottom: fetch,
  forward, backward re-fetch, gradient out, optimizer pipeline, refresh.
* :class:`ParameterStreamer` - large weights live in the :class:`~engine.storage.TensorStore`
  and are streamed through pinned staging slots for forward and backward.
* Placement roles (:mod:`.placement`): the NVMe path (:class:`GradientOffload`,
  :class:`OptimizerStepper`) or the DRAM path (:class:`DramGradients`, :class:`DramOptimizer`).
* :func:`initialize_into_store` - materialize a meta-device model straight into the store.
* :func:`plan_staging` / :class:`BufferPlan` - staging memory from shapes alone.
* :func:`open_streamer` - pool + store + attached streamer in one call (with the ablation switches).

Ablation switches (DESIGN.md section 5): ``buffer_pool`` = ``adaptive`` | ``uniform``,
``pinned_alloc`` = ``exact`` | ``torch``, ``store`` = ``direct`` | ``files`` (the TensorStore layout).
"""
from .buffers import BUFFER_POOLS, PINNED_ALLOCS, BufferPlan, StagingBuffers, StagingExhaustedError, plan_buffers
from .gradients import GradientOffload
from .materialize import initialize_into_store
from .params import DEFAULT_RESIDENT_THRESHOLD, StreamedParameter, StreamingError, is_placeholder, param_key
from .placement import GradientSink, OptimizerBackend, TrainablePlacement
from .resident import DramGradients, DramOptimizer
from .runtime import OffloadRuntime
from .standalone import open_streamer
from .stepper import OptimizerStepper
from .streamer import ParameterStreamer, plan_staging

__all__ = [
    "BUFFER_POOLS", "BufferPlan", "DEFAULT_RESIDENT_THRESHOLD", "DramGradients", "DramOptimizer", "GradientOffload",
    "GradientSink", "OffloadRuntime", "OptimizerBackend", "OptimizerStepper", "PINNED_ALLOCS", "ParameterStreamer",
    "StagingBuffers", "StagingExhaustedError", "TrainablePlacement", "initialize_into_store", "is_placeholder",
    "open_streamer", "param_key", "plan_buffers", "plan_staging", "StreamedParameter", "StreamingError",
]
