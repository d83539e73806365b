"""The memory planner: what a training run will need, from shapes alone, before anything
is allocated.

Host staging memory (one PinnedPool, allocated once at ``engine.initialize``):

* parameter streaming: the streamer's size-class slots for ``prefetch_depth + 1``
  units (or ``buffer_count`` slots x the largest tensor, the uniform ablation);
* gradient staging: the pinned blocks in flight to NVMe (at least the largest
  trainable tensor in fp32);
* the optimizer pipeline: three buffer sets of one sub-group's master weights,
  gradients, moments and low-precision weights.

Disk: compute weights, fp32 master (mixed precision), two moments and an fp32
gradient per trainable parameter, rounded to 4 KiB. The predicted peak adds the
resident (small) parameters, the process itself (its RSS when planning, less any
real model weights that are about to move to NVMe) and the activations: given
as bytes, or estimated from ``example_inputs`` by running forward and backward
on the meta device and adding up what autograd saves (:func:`estimate_activation_bytes`).

Partial fine-tuning (PEFT): frozen parameters (``requires_grad=False``) are sized in
``frozen_dtype`` and need only their read-only copy on disk - no gradient, no optimizer
state. ``trainable_placement`` ``"auto"`` keeps the trainable parameters, their fp32
gradients and their optimizer state in DRAM (no gradient staging, no optimizer pipeline)
when the model has frozen parameters and that state is no larger than the pinned
gradient staging and optimizer pipeline the NVMe path would need; full fine-tuning keeps
its state on NVMe (DESIGN.md section 3).

``prefetch_depth`` left at ``"auto"`` is the largest of 2, 1, 0 that fits the
``host_memory_budget`` (2 without a budget); ``sub_group_size`` ``"auto"`` is one
store segment (4 Mi elements): the optimizer's I/O is chunked, so larger
sub-groups only cost memory. If even the smallest choice does not fit, planning
fails with what is needed and what is available - before any allocation or write.

Several ranks (torchrun; ``world_size``/``rank`` given, else the initialized process group or
torchrun's environment): a plan is one rank's. With ``state_partitioning`` ``"partitioned"`` every
store tensor (weights, fp32 masters, moments, gradients) holds ``Partition.own`` elements on disk -
rank 0's share, the largest, so every rank's plan is the same; staging slots hold a gathered weight
(``Partition.padded`` elements, ``StreamedParam.slot_nbytes``); the optimizer's sub-groups are cut
over the shards; gradient staging adds one padded fp32 gradient (the reduce-scatter's buffer) to the
shard's. ``"replicated"``: every rank plans the whole state, as one process does.

GPU memory (:mod:`engine.offload.gpuplan`): for a CUDA (or ``"separate"``) device the plan also
predicts what the GPU holds (resident parameters and buffers, the streamed-weight window,
gradient staging, activations) and checks it against ``gpu_memory`` (the argument, else
``Config.gpu_memory``) or the card's free memory;
an ``"auto"`` depth is then the largest that fits both budgets. On CUDA the activations are
counted on the GPU, not in host memory. For the CPU device the GPU figures are 0.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from .. import dtypes, procinfo
from ..config import Config
from ..errors import EngineError, PlanError  # noqa: F401 - PlanError re-exported
from ..memory.pool import IO_ALIGNMENT, round_up_io
from ..storage.backing import available_bytes
from ..storage.segments import DEFAULT_SEGMENT_ELEMENTS
from ..storage.segments import largest_extent as _extent_bytes
from ..storage.store import path_share
from ..units import format_bytes
from . import gpuplan
from .activations import estimate_activation_bytes
from .buffers import plan_for_params
from .params import discover
from .planranks import grad_staging as _grad_staging
from .planranks import planned_ranks, planning_partition, stored_shape
from .stepper import OptimizerStepper, ParamSpec

PROCESS_OVERHEAD = 400 << 20  # fallback when /proc is unreadable: RSS of Python + torch + the engine
DTYPES = dtypes.BY_NAME  # config name -> torch dtype (kept importable from here)
# Master weights and gradients are fp32 whatever the compute dtype (the stepper's and the gradient path's choice).
FP32_BYTES = dtypes.FP32_BYTES


@dataclass
class MemoryPlan:
    """What a run needs. All sizes in bytes."""

    prefetch_depth: int
    sub_group_elements: int
    segment_elements: int
    staging_bytes: int          # parameter streaming slots
    grad_staging_bytes: int     # gradients in flight to NVMe
    optimizer_bytes: int        # three optimizer buffer sets
    pool_bytes: int             # the PinnedPool: the sum of the three
    resident_bytes: int         # small parameters kept in memory (compute dtype)
    flat_grad_bytes: int        # the flat gradient buffer (grad_buffer="flat" ablation only)
    activation_bytes: int       # given or estimated (0: not included)
    process_bytes: int          # the process itself (RSS when planning, less real model weights)
    predicted_peak_bytes: int
    disk_bytes: int
    disk_per_path: dict
    budget_bytes: Optional[int]
    streamed_params: int
    trainable_params: int
    trainable_in_memory: bool = False  # trainable params, gradients and optimizer state in DRAM
    trainable_state_bytes: int = 0     # their fp32 master (mixed), gradient and moments, when in DRAM
    disk_largest_extent: int = 0       # the largest extent (store segment, or file) on disk: bounds per-path shares
    # The compute device planned for ("cpu", "cuda:0", "separate (cpu)") and what its memory holds
    # (all 0 / None for the CPU; see engine.offload.gpuplan).
    device: str = "cpu"
    gpu_resident_bytes: int = 0        # resident parameters (compute dtype) and buffers
    gpu_window_bytes: int = 0          # device copies of the streamed weights of prefetch_depth + 1 units
    gpu_grad_bytes: int = 0            # the largest gradient in compute dtype and in fp32
    gpu_activation_bytes: int = 0
    gpu_peak_bytes: int = 0            # the sum of the four
    gpu_budget_bytes: Optional[int] = None  # gpu_memory, or the card's free memory when planning
    # Several ranks: the plan is one rank's (see the module docstring); "none" for one process.
    world_size: int = 1
    rank: int = 0
    state_partitioning: str = "none"   # "none" (one process), "partitioned" or "replicated"

    @property
    def host_fits(self) -> bool:
        return self.budget_bytes is None or self.predicted_peak_bytes <= self.budget_bytes

    @property
    def gpu_fits(self) -> bool:
        return self.gpu_budget_bytes is None or self.gpu_peak_bytes <= self.gpu_budget_bytes

    @property
    def fits(self) -> bool:
        """Host memory and (when planned) GPU memory both within their budgets."""
        return self.host_fits and self.gpu_fits

    def table(self) -> str:
        """A human-readable summary (the CLI's ``plan`` prints it)."""
        rows = self._rank_rows() + [
            ("parameters streamed / trainable", f"{self.streamed_params:,} / {self.trainable_params:,}"),
            ("prefetch depth", str(self.prefetch_depth)),
            ("optimizer sub-group", f"{self.sub_group_elements:,} elements"),
            ("pinned pool: parameter staging", format_bytes(self.staging_bytes)),
            ("pinned pool: gradient staging", format_bytes(self.grad_staging_bytes)),
            ("pinned pool: optimizer pipeline", format_bytes(self.optimizer_bytes)),
            ("pinned pool total", format_bytes(self.pool_bytes)),
            ("resident parameters", format_bytes(self.resident_bytes)),
            ("trainable state", f"{format_bytes(self.trainable_state_bytes)} in memory" if self.trainable_in_memory
             else "on NVMe"),
            ("flat gradient buffer (ablation)", format_bytes(self.flat_grad_bytes)),
            ("activations", format_bytes(self.activation_bytes) if self.activation_bytes else "not included"),
            ("process (Python, torch, ...)", format_bytes(self.process_bytes)),
            ("predicted peak host memory", format_bytes(self.predicted_peak_bytes)),
            ("host memory budget", format_bytes(self.budget_bytes) if self.budget_bytes else "none"),
        ] + self._gpu_rows() + [
            ("fits", "yes" if self.fits else "NO"),
        ] + [(f"disk on {p}", format_bytes(b)) for p, b in self.disk_per_path.items()]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)

    def _rank_rows(self) -> list[tuple[str, str]]:
        if self.world_size == 1:
            return []
        if self.state_partitioning == "partitioned":
            how = (f"partitioned: disk holds 1/{self.world_size} of every store tensor (rank 0's share, the "
                   "largest); staging slots hold gathered weights")
        else:
            how = "replicated: every rank holds the whole state"
        return [("ranks", f"rank {self.rank} of {self.world_size} (figures per rank)"), ("state", how)]

    def _gpu_rows(self) -> list[tuple[str, str]]:
        if self.device == "cpu":
            return []
        return [
            ("compute device", self.device),
            ("GPU: resident parameters, buffers", format_bytes(self.gpu_resident_bytes)),
            ("GPU: streamed-weight window", format_bytes(self.gpu_window_bytes)),
            ("GPU: gradient staging", format_bytes(self.gpu_grad_bytes)),
            ("GPU: activations", format_bytes(self.gpu_activation_bytes) if self.gpu_activation_bytes
             else "not included"),
            ("predicted peak GPU memory", format_bytes(self.gpu_peak_bytes)),
            ("GPU memory budget", format_bytes(self.gpu_budget_bytes) if self.gpu_budget_bytes else "none"),
        ]


def _trainable(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    seen, out = set(), []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, tuple(p.shape)))
    return out


def plan(model: nn.Module, config: Config, *, activation_bytes: int = 0, example_inputs: Optional[dict] = None,
         segment_elements: int = DEFAULT_SEGMENT_ELEMENTS, gpu_memory: Union[int, str, None] = None,
         enforce_budgets: bool = True, world_size: Optional[int] = None,
         rank: Optional[int] = None) -> MemoryPlan:
    """Plans host, GPU and disk memory for training ``model`` (real or meta device) with ``config``.

    ``example_inputs``: keyword arguments of one training forward (e.g. ``input_ids`` and
    ``labels`` of the batch shape); their activations are estimated on the meta device.
    ``gpu_memory`` (bytes or ``"24GiB"``): the GPU budget, planning for that card whether or not
    this machine has one; default: ``config.gpu_memory``, else the free memory of ``config.device``
    when it is CUDA (the argument wins over the field).
    Raises :class:`PlanError` when ``config.host_memory_budget`` or the GPU budget cannot be met,
    saying by how much; ``enforce_budgets=False`` returns the smallest plan instead (``fits`` False).
    ``world_size`` / ``rank``: plan one of several ranks (default: the initialized process group,
    else torchrun's ``WORLD_SIZE`` / ``RANK``, else one process).
    """
    world_size, rank = planned_ranks(world_size, rank)
    partition = planning_partition(world_size, config.state_partitioning)
    target = gpuplan.gpu_target(model, config.device, gpu_memory, config.gpu_memory)
    if example_inputs is not None:
        activation_bytes = estimate_activation_bytes(model, example_inputs, DTYPES[config.dtype],
                                                     frozen_dtype=DTYPES[config.frozen_dtype or config.dtype])
    process = _process_bytes(model)

    compute = DTYPES[config.dtype]
    frozen_dtype = DTYPES[config.frozen_dtype or config.dtype]
    state = DTYPES[config.optimizer_state_dtype]
    threshold = config.resident_threshold_bytes

    def dtype_of(p: torch.Tensor) -> torch.dtype:
        """The dtype the trainer gives ``p``, whatever dtype the model was built in."""
        if not p.is_floating_point():
            return p.dtype
        return compute if p.requires_grad else frozen_dtype

    trainable = _trainable(model)
    # On the NVMe path the stepper and the store see shards when partitioned (1-D, own() elements).
    stored = [(n, stored_shape(s, partition)) for n, s in trainable]
    specs = [ParamSpec(n, s) for n, s in stored]
    largest = max((math.prod(s) for _, s in trainable), default=0)
    numel_trainable = sum(math.prod(s) for _, s in trainable)
    nvme_grad_staging = _grad_staging(largest, partition) if trainable else 0
    in_memory = _trainable_in_memory(model, config, numel_trainable, compute, state,
                                     nvme_grad_staging + OptimizerStepper.buffer_bytes(
                                         specs, segment_elements, segment_elements, compute, state))
    params = discover(model, threshold, resident_trainable=in_memory, dtype_of=dtype_of, partition=partition)
    grad_staging = 0 if in_memory else nvme_grad_staging
    resident = sum(p.numel() * dtypes.itemsize(dtype_of(p)) for _, p in params.resident)
    trainable_state = _memory_state_bytes(numel_trainable, compute, state) if in_memory else 0
    scale = dtypes.itemsize(compute)
    flat = numel_trainable * scale if config.grad_buffer == "flat" and not in_memory else 0

    def staging_for(depth: int) -> int:
        if config.offload_params != "nvme":
            return 0
        # Slots sized in the dtypes the parameters will have (dtype_of), not the model's current ones,
        # by StreamedParam.slot_nbytes (partitioned: a gathered weight, Partition.padded elements).
        bp = plan_for_params(params, depth, config.buffer_pool,
                             config.buffer_count if config.buffer_pool == "uniform" else None)
        return sum(round_up_io(size) * n for size, n in bp.classes.items())

    def optimizer_for(sub_group: int) -> int:
        if in_memory:
            return 0
        return OptimizerStepper.buffer_bytes(specs, segment_elements, sub_group, compute, state)

    streams = config.offload_params == "nvme"
    gpu_resident = gpuplan.resident_bytes(model, params, dtype_of, streams) if target.planned else 0
    gpu_grads = gpuplan.grad_bytes([s for _, s in trainable], compute) if target.planned else 0
    gpu_activations = activation_bytes if target.planned else 0
    host_activations = 0 if target.kind == "cuda" else activation_bytes  # on CUDA they live on the GPU

    def window_for(depth: int) -> int:
        if not (target.planned and streams):
            return 0
        return gpuplan.window_bytes(params, depth)

    budget = config.budget_bytes
    depths: list[int] = [config.prefetch_depth] if isinstance(config.prefetch_depth, int) else [2, 1, 0]
    # One segment per sub-group: I/O is chunked anyway, so larger sub-groups only cost memory.
    groups: list[int] = [config.sub_group_size] if isinstance(config.sub_group_size, int) else [segment_elements]

    def build(depth: int, group: int) -> MemoryPlan:
        staging, optimizer = staging_for(depth), optimizer_for(group)
        # At least one I/O page: a model whose weights all stay resident and whose adapters train
        # in DRAM stages nothing, but the pool (and its registrations) must still exist.
        pool = max(staging + grad_staging + optimizer, IO_ALIGNMENT)
        peak = pool + resident + flat + host_activations + process + trainable_state
        window = window_for(depth)
        on_disk = _disk_tensors([] if in_memory else stored, params, compute, state, config, frozen_dtype)
        disk = sum(round_up_io(n * size) for n, size in on_disk)
        largest_extent = max((_extent_bytes(n * size, size, segment_elements, config.store) for n, size in on_disk),
                             default=0)
        paths = config.nvme_paths or ["(private temporary directory)"]
        share = path_share(disk, len(paths), largest_extent)
        return MemoryPlan(depth, group, segment_elements, staging, grad_staging, optimizer, pool, resident, flat,
                          activation_bytes, process, peak, disk, {p: share for p in paths}, budget,
                          sum(math.prod(sp.shape) for sp in params.streamed.values()), numel_trainable,
                          in_memory, trainable_state, largest_extent, target.label, gpu_resident, window,
                          gpu_grads, gpu_activations, gpu_resident + window + gpu_grads + gpu_activations,
                          target.budget_bytes, world_size, rank,
                          "none" if world_size == 1 else config.state_partitioning)

    candidates = [build(d, g) for d in depths for g in groups]
    fitting = [c for c in candidates if c.fits]
    if fitting:
        return fitting[0]
    smallest = min(candidates, key=lambda c: (c.predicted_peak_bytes, c.gpu_peak_bytes))
    if not enforce_budgets:
        return smallest
    problems = []
    if not smallest.host_fits:
        assert budget is not None
        problems.append(
            f"host_memory_budget {format_bytes(budget)} is too small: the smallest plan needs "
            f"{format_bytes(smallest.predicted_peak_bytes)} (pinned pool {format_bytes(smallest.pool_bytes)}, "
            f"resident parameters {format_bytes(smallest.resident_bytes)}, process {format_bytes(process)}"
            + (f", activations {format_bytes(host_activations)}" if host_activations else "")
            + f"), {format_bytes(smallest.predicted_peak_bytes - budget)} more")
    if not smallest.gpu_fits:
        assert smallest.gpu_budget_bytes is not None
        parts = (f"resident parameters and buffers {format_bytes(gpu_resident)}, streamed-weight window "
                 f"{format_bytes(smallest.gpu_window_bytes)} at prefetch depth {smallest.prefetch_depth}, "
                 f"gradient staging {format_bytes(gpu_grads)}"
                 + (f", activations {format_bytes(gpu_activations)}" if gpu_activations else ""))
        problems.append(gpuplan.shortfall(target.label, smallest.gpu_peak_bytes, smallest.gpu_budget_bytes, parts))
    raise PlanError("; ".join(problems))


def _memory_state_bytes(numel: int, compute: torch.dtype, state: torch.dtype) -> int:
    """DRAM for trainable parameters kept in memory, beyond the parameters themselves: the fp32
    master (mixed precision only), the fp32 gradient and the two moments."""
    master = FP32_BYTES if compute != torch.float32 else 0
    return numel * (master + FP32_BYTES + 2 * dtypes.itemsize(state))


def _trainable_in_memory(model: nn.Module, config: Config, numel_trainable: int, compute: torch.dtype,
                         state: torch.dtype, nvme_pinned_bytes: int) -> bool:
    """Where trainable state lives: ``trainable_placement``, or for ``"auto"`` DRAM when some
    parameters are frozen (PEFT) and the state costs no more than the pinned gradient staging
    and optimizer pipeline that keeping it on NVMe would take."""
    if config.trainable_placement != "auto":
        return config.trainable_placement == "memory"
    if not any(not p.requires_grad for p in model.parameters()):
        return False
    return _memory_state_bytes(numel_trainable, compute, state) <= nvme_pinned_bytes


def _process_bytes(model: nn.Module) -> int:
    """This process's RSS now, less the bytes of real (CPU) model weights that training moves to NVMe."""
    try:
        rss = procinfo.rss_bytes()
    except (OSError, *procinfo.ProcessGone):
        return PROCESS_OVERHEAD
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cpu")
    return max(rss - weights, 0)


def _disk_tensors(trainable, params, compute: torch.dtype, state: torch.dtype, config: Config,
                  frozen_dtype: Optional[torch.dtype] = None) -> list[tuple[int, int]]:
    """(elements, bytes per element) of every tensor the run keeps on disk."""
    itemsize = dtypes.itemsize(compute)
    s_itemsize = dtypes.itemsize(state)
    out: list[tuple[int, int]] = []
    for _, shape in trainable:
        n = math.prod(shape)
        out.append((n, itemsize))                          # compute weights ("param")
        if compute != torch.float32:
            out.append((n, FP32_BYTES))                    # fp32 master
        out += [(n, s_itemsize)] * 2                       # Adam moments
        if config.grad_buffer == "streamed":
            out.append((n, FP32_BYTES))                    # fp32 gradient
    frozen = [sp for sp in params.streamed.values() if not sp.param.requires_grad]
    frozen_itemsize = dtypes.itemsize(frozen_dtype or compute)
    out += [(math.prod(sp.store_shape), frozen_itemsize) for sp in frozen]  # partitioned: the shard
    return out


def check_disk(plan: MemoryPlan, paths: list[str], *, ranks: Optional[list[list[str]]] = None) -> None:
    """Raises :class:`PlanError` when a path's file system cannot hold the plan's bytes placed
    there: each path holds its share (:func:`~engine.storage.store.path_share`, the figure the
    store checks and reserves), and paths on one file system share its free space. ``ranks``:
    every rank of this machine's paths (formatted per rank), when several ranks' stores will share
    the drives (planning before a launch); default: ``paths``, this process's alone."""
    placed = ranks if ranks is not None else [paths]
    share = path_share(plan.disk_bytes, len(paths), plan.disk_largest_extent)
    groups: dict[int, list[str]] = {}
    for rank_paths in placed:
        for p in rank_paths:
            groups.setdefault(os.stat(p).st_dev, []).append(p)
    for members in groups.values():
        available = available_bytes(members[0])
        needed = share * len(members)
        if needed > available:
            striped = (f" (its share of {format_bytes(plan.disk_bytes)} striped over {len(paths)} paths)"
                       if len(paths) > 1 else "")
            sharing = f" for {len(placed)} ranks" if len(placed) > 1 else ""
            raise PlanError(f"not enough disk space on {', '.join(dict.fromkeys(members))}: the run needs "
                            f"{format_bytes(needed)}{sharing}{striped}, {format_bytes(available)} available")
