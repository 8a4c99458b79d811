"""Processes and data order for distillation: one process or torch.distributed (DDP).

Launch several processes with ``torchrun --nproc_per_node N script.py``; :func:`setup`
initialises the process group from torchrun's environment (``gloo`` on CPU, ``nccl`` on GPU,
one GPU per local rank) and :func:`wrap` puts the student in DistributedDataParallel.

The data order is a pure function of (seed, step): :class:`StepBatches` draws one seeded
permutation per epoch, cuts it into *global* batches of ``batch_size`` items, gives each
rank its contiguous share and cuts that share into ``accumulate`` micro-batches. Every item
carries its own seed for random augmentation. So N processes see, together, exactly the
items one process sees with the same global batch; and a run resumed at step ``s`` sees
the same items, augmented the same way, as a run that never stopped.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Sampler

from gn_convert.errors import OptionError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Processes:
    """This process's place in the job.

    Attributes:
        rank: global rank (0 in a single process).
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU).
        device: the device this process computes on.
        owns_group: True when :func:`setup` created the process group (and tears it down).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs, shows progress and writes checkpoints."""
        return self.rank == 0


def setup(device: torch.device | str | None = None) -> Processes:
    """Join (or create) the process group torchrun describes, and pick this process's device.

    Without torchrun (``WORLD_SIZE`` unset or 1) and without an initialised group this is a
    single process. An existing process group (initialised by the caller) is reused.

    Args:
        device: the device for a single process; default CUDA when available, else CPU.
            Under torchrun with CUDA each process uses ``cuda:LOCAL_RANK``.

    Returns:
        The :class:`Processes` description.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda") \
            else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
        owns = True
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        on_gpu = dist.get_backend() == "nccl"
        chosen = torch.device("cuda", local_rank) if on_gpu else torch.device(device or "cpu")
        return Processes(rank, world, local_rank, chosen, owns)
    chosen = torch.device(device) if device is not None else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Processes(device=chosen)


def teardown(procs: Processes) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if procs.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, procs: Processes) -> nn.Module:
    """The model in DistributedDataParallel when distributed, else the model itself."""
    if not procs.distributed:
        return model
    ids = [procs.device.index] if procs.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def all_sum(values: list[float], procs: Processes) -> list[float]:
    """Sum a few numbers over all processes (identity in a single process)."""
    if not procs.distributed:
        return list(values)
    backend_device = procs.device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=backend_device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def from_main(value: Any, procs: Processes) -> Any:
    """Rank 0's ``value`` on every process (a decision all ranks must share; identity in one process).

    Only picklable plain values (numbers, strings, dicts, lists, plans) belong here.
    """
    if not procs.distributed:
        return value
    box = [value if procs.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_gradients(params: list[nn.Parameter], procs: Processes) -> None:
    """Average the gradients of ``params`` over the processes (for updates outside DDP's wrapper)."""
    if not procs.distributed:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(procs.world_size)


def barrier(procs: Processes) -> None:
    """Wait for every process (no-op in a single process)."""
    if procs.distributed:
        dist.barrier()


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (seed, epoch, index, rank...)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


class StepBatches(Sampler[list[tuple[int, int]]]):
    """Micro-batches of ``(index, item_seed)`` for one rank, from a given step to the end.

    Args:
        size: items in the dataset.
        batch_size: the global batch (all ranks, all micro-batches) of one optimizer step.
        start: the first step to yield (0, or the step a resumed run continues from).
        steps: the step to stop before.
        seed: seed of the epoch permutations and of each item's augmentation.
        rank: this process's rank.
        world_size: number of processes.
        accumulate: micro-batches per optimizer step on each rank.

    Raises:
        OptionError: the global batch does not split evenly, or exceeds the dataset.
    """

    def __init__(self, size: int, batch_size: int, start: int, steps: int, seed: int,
                 rank: int = 0, world_size: int = 1, accumulate: int = 1) -> None:
        if batch_size % (world_size * accumulate):
            raise OptionError(f"batch size {batch_size} is not divisible by {world_size} processes x "
                                 f"{accumulate} accumulation steps; pick a multiple of {world_size * accumulate}")
        if size < batch_size:
            raise OptionError(f"the training data has {size} items, fewer than one batch of {batch_size}; "
                                 "add data or lower the batch size")
        self.size, self.batch_size, self.start, self.steps = size, batch_size, start, steps
        self.seed, self.rank, self.world_size, self.accumulate = seed, rank, world_size, accumulate
        self.per_epoch = size // batch_size

    def __len__(self) -> int:
        return max(self.steps - self.start, 0) * self.accumulate

    def epoch_order(self, epoch: int) -> list[int]:
        """The seeded permutation of epoch ``epoch``."""
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.size, generator=gen).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        share = self.batch_size // self.world_size
        micro = share // self.accumulate
        epoch, order = -1, []
        for step in range(self.start, self.steps):
            e, k = divmod(step, self.per_epoch)
            if e != epoch:
                epoch, order = e, self.epoch_order(e)
            mine = order[k * self.batch_size + self.rank * share:][:share]
            for j in range(self.accumulate):
                yield [(i, mix_seed(self.seed, e, i)) for i in mine[j * micro:(j + 1) * micro]]


class SeededItems(Dataset):
    """Fetch ``dataset[index]`` with torch's and Python's RNG seeded from the item's seed.

    Random augmentation then depends only on (seed, epoch, index): not on the process, the
    worker, or what ran before. The caller's RNG state is left untouched.

    With ``mixup`` > 0 each item is blended with a second item drawn from the same seed, with a
    weight from Beta(mixup, mixup), and loses its label (-1): the blend is a property of the
    item, so a batch split over processes or micro-batches is the same batch.

    Args:
        dataset: items ``(image, label)``.
        mixup: the Beta distribution's parameter; 0 (default) for no blending.
    """

    def __init__(self, dataset: Dataset, mixup: float = 0.0) -> None:
        self.dataset, self.mixup = dataset, mixup

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, item_seed = key
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            random.seed(item_seed)
            try:
                item = self.dataset[index]
                if self.mixup <= 0:
                    return item
                partner = self.dataset[int(torch.randint(len(self), (1,)))]
                weight = float(torch.distributions.Beta(self.mixup, self.mixup).sample())
                return weight * item[0] + (1 - weight) * partner[0], -1
            finally:
                random.setstate(state)
