"""Sharding work, and data-parallel training, over processes started by ``accelerate launch``
(one GPU each) or ``torchrun``.

A single process (plain ``python ...``) runs everything itself; nothing here needs a launcher. On
machines without GPUs, ``torchrun --nproc_per_node 2 ...`` runs CPU processes that talk over gloo
(``accelerate launch --cpu`` starts a single process).
"""
from __future__ import annotations

import atexit
from typing import Callable, Sequence

import torch

from .errors import ConfigError

_shutdown_registered: list[bool] = []


def process_state():
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # CPU-only: several processes talk over gloo
    if state.num_processes > 1 and not _shutdown_registered:
        _shutdown_registered.append(True)
        atexit.register(_shutdown, state)
    if state.num_processes > 1 and state.device.type == "cuda" and state.num_processes > torch.cuda.device_count():
        raise ConfigError(f"accelerate started {state.num_processes} processes but only {torch.cuda.device_count()} "
                          "GPUs are visible; use --num_processes <= the number of GPUs")
    return state


def _shutdown(state) -> None:
    """Leave together: a process that exits while its peers still talk to it makes them abort."""
    state.wait_for_everyone()
    torch.distributed.destroy_process_group()


def is_main_process() -> bool:
    return process_state().is_main_process


def shard_map(fn: Callable[[list[int]], Sequence], num_items: int) -> list:
    """``fn(indices)`` (one result per index) on this process's share of ``range(num_items)``
    (every k-th item), with the results of all processes gathered back into item order."""
    state = process_state()
    if state.num_processes == 1:
        return list(fn(list(range(num_items))))
    from accelerate.utils import gather_object

    mine = list(range(state.process_index, num_items, state.num_processes))
    local = [x.cpu() if isinstance(x, torch.Tensor) else x for x in fn(mine)] if mine else []
    shards = gather_object([local])  # one list per process, in rank order
    out = [None] * num_items
    for rank, shard in enumerate(shards):
        out[rank::state.num_processes] = shard
    return out


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """All processes' rows in item order, where process r holds items r::P (equal shares).

    Differentiable: the backward pass sums every process's gradient for this process's rows,
    so a quantity that all processes compute from the gathered rows gets P times its gradient
    here, which averaging the gradients over the processes turns back into one copy.
    """
    state = process_state()
    if state.num_processes == 1:
        return rows
    from torch.distributed.nn.functional import all_gather

    return torch.stack(all_gather(rows), 1).flatten(0, 1)  # (R, P, ...) -> item i*P + r


def mean_over_processes(values: list[float]) -> list[float]:
    """Each figure averaged over the processes (one all-reduce): global means of equal shares."""
    state = process_state()
    if state.num_processes == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=state.device)
    torch.distributed.all_reduce(total)
    return (total / state.num_processes).tolist()


def average_gradients(params) -> None:
    """Replace every gradient by its mean over the processes (one all-reduce), so all take the same step."""
    state = process_state()
    if state.num_processes == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= state.num_processes
    for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(mean.view_as(grad))
