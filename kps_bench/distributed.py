"""Several processes on one run, as launched by ``torchrun`` or ``accelerate launch``: which share of the work each
rank does, and the few exchanges the ranks need.

The launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``) names the ranks; they exchange small Python objects over gloo, whatever device they compute on.
Work is dealt in the units that one process would make (generation and encoder batches): item ``i`` goes to rank
``i % world``, so every batch holds the same images as in a one-process run, and gives the same bytes. One process
(no launcher) is rank 0 of 1: nothing is exchanged, and each helper does what a plain loop would.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

from .errors import UserError, as_user_error

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in a launch: ``rank`` of ``world`` in all, ``local_rank`` of ``local_world`` on this
    machine. ``group`` is the gloo process group the ranks talk over (None: the default group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    group: object = None

    @property
    def main(self) -> bool:
        """Rank 0: the one that holds the run folder's lock, scores and writes the results."""
        return self.rank == 0

    def mine(self, items: Iterable[T]) -> Iterator[T]:
        """This rank's share of ``items``, which every rank lists alike: items ``rank``, ``rank + world``, ..."""
        return itertools.islice(items, self.rank, None, self.world)

    def share(self, n: int, chunk: int) -> int:
        """How many of ``n`` items :meth:`mine` gives this rank when they are dealt in chunks of ``chunk`` (the
        last chunk may be short)."""
        chunks = -(-n // chunk)
        mine = range(self.rank, chunks, self.world)
        return len(mine) * chunk - (chunks * chunk - n if mine and mine[-1] == chunks - 1 else 0)

    def device(self, device: str) -> str:
        """This rank's device for a resolved ``--device``: ``cuda`` is ``cuda:LOCAL_RANK`` under a launcher, which
        needs a GPU per process on this machine; one named GPU or MPS cannot be shared by several ranks."""
        if self.world == 1 or device == "cpu":
            return device
        how = (f"{self.world} processes were launched ({self.local_world} on this machine, e.g. torchrun "
               f"--nproc_per_node {self.local_world} or accelerate launch --num_processes {self.world})")
        if device != "cuda":
            raise UserError(f"--device {device} names one device, but {how}, and each process needs its own. Give "
                            f"--device cuda (rank i uses cuda:LOCAL_RANK) or --device cpu, or launch one process.")
        import torch

        visible = torch.cuda.device_count()
        if self.local_world > visible:
            raise UserError(f"{how}, but only {visible} GPU(s) are visible here, one per process is needed. Launch "
                            f"{visible} process(es) per machine (--nproc_per_node {visible} or --num_processes "
                            f"{visible}), make more GPUs visible (CUDA_VISIBLE_DEVICES), or give --device cpu.")
        torch.cuda.set_device(self.local_rank)
        return f"cuda:{self.local_rank}"

    def check(self, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank, then a meeting of all ranks: when it raised on any rank, it raises on every rank
        (the rank's own error there, one that names the failed rank elsewhere), so no rank waits for one that
        stopped. A user error (a UserError, or what :func:`~kps_bench.errors.as_user_error` makes one of: a path that
        cannot be written, a full disk) is a UserError on every rank, so every rank exits 2, with its message.
        Returns this rank's value."""
        try:
            value = fn()
        except Exception as e:
            self._meet(e)
            raise
        self._meet(None)
        return value

    def gather(self, fn: Callable[[], T]) -> list[T] | None:
        """``fn()`` on every rank (as :meth:`check`); rank 0 gets every rank's value in rank order, the others
        None."""
        value = self.check(fn)
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        values = [None] * self.world if self.main else None
        dist.gather_object(value, values, dst=0, group=self.group)
        return values

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0 alone (as :meth:`check`); every rank gets its value."""
        value = self.check(lambda: fn() if self.main else None)
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _meet(self, error: Exception | None) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        outcomes, report = [None] * self.world, None
        if error is not None:
            user = error if isinstance(error, UserError) else as_user_error(error)
            report = (True, str(user)) if user else (False, str(error) or type(error).__name__)
        dist.all_gather_object(outcomes, report, group=self.group)
        if error is not None:
            return
        for rank, failed in enumerate(outcomes):
            if failed:
                user, message = failed
                raise (UserError if user else RuntimeError)(f"rank {rank} of {self.world} stopped: {message}")


SINGLE = Ranks()


def launch_rank() -> int:
    """This process's rank, from the launcher's environment (``RANK``; 0 without a launcher), before any process group
    exists."""
    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def launched() -> Iterator[Ranks]:
    """The ranks of this launch (one process without a launcher), their gloo group set up for the block. Only rank 0
    writes to the console."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield SINGLE
        return
    import torch.distributed as dist

    from .ui import console

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo")  # env:// (the launcher's MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)
    group = None if own else dist.new_group(backend="gloo")
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                  int(os.environ.get("LOCAL_WORLD_SIZE", str(world))), group)
    quiet, console.quiet = console.quiet, console.quiet or not ranks.main
    try:
        yield ranks
    finally:
        console.quiet = quiet
        if own:
            # every rank leaves together: a rank that tears its gloo group down while another still holds its
            # connections can abort the other at exit ("terminate called without an active exception")
            dist.barrier()
            dist.destroy_process_group()
