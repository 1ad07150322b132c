"""Which process this is, when several run under ``accelerate launch`` (or torchrun)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from semroute.shared.errors import SemrouteError
from semroute.shared.llm import AUTO_DEVICES, resolve_device


@dataclass
class ProcessInfo:
    rank: int
    world_size: int
    device: torch.device
    _state: object | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device_for(self, requested: str | torch.device | None) -> torch.device:
        """The device this process runs its model on: ``requested`` (``resolve_device``), except that auto under
        several processes is this process's own (accelerate gives each its GPU), so the ranks do not share one."""
        if self.world_size > 1 and requested in AUTO_DEVICES:
            return self.device
        return resolve_device(requested)

    def barrier(self) -> None:
        if self._state is not None and self.world_size > 1:
            self._state.wait_for_everyone()

    def broadcast(self, obj):
        """``obj`` from rank 0 on every rank (e.g. rank 0's 'ok' or its error, so no rank waits forever)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        # A barrier (no tensors) after it: gloo's worker thread releases a finished broadcast's tensors only when
        # it takes its next work, and releasing them needs the GIL. Were the broadcast the job's last collective,
        # the process group's destructor at exit (run with the GIL held, when the DDP model is freed) would join
        # that thread while it waits for the GIL: a hang seen once in the 2-process demo test (gdb: main thread
        # in ~ProcessGroupGloo from ~Reducer, pt_gloo_runloop in ~AsyncBroadcastWork -> take_gil). This made the
        # hang rarer, not impossible (gloo has two worker threads): a command now ends without freeing the
        # process group (shared/processes.py end_process).
        torch.distributed.barrier()
        return box[0]

    def run_on_main(self, fn):
        """Run ``fn`` on rank 0 and give its result to every rank; if it raises, every rank raises (rank 0
        the original error), so no process waits forever for one that failed."""
        result: object = None
        if self.is_main:
            try:
                result = ("ok", fn())
            except BaseException as err:  # noqa: BLE001 - re-raised below, on every rank
                result = ("error", err)
        result = self.broadcast(result)
        if result[0] == "error":
            if self.is_main:
                raise result[1]
            raise MainProcessFailed(f"rank 0 failed: {result[1]}")
        return result[1]

    def gather_object(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])


class MainProcessFailed(SemrouteError):
    """Raised on the other ranks by :meth:`ProcessInfo.run_on_main` when rank 0's part failed: a consequence of
    rank 0's error, which rank 0 raises and reports itself (``stage2_train/ranks.py`` does not post this one as
    the job's failure)."""


def process_info() -> ProcessInfo:
    """Use accelerate's process group when launched on several processes; else a plain single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        # On a machine without GPUs, `accelerate launch --multi_gpu` still starts N processes, but
        # PartialState only joins them into one (gloo) group when told to run on the CPU.
        state = PartialState(cpu=not torch.cuda.is_available())
        return ProcessInfo(state.process_index, state.num_processes, state.device, state)
    return ProcessInfo(0, 1, resolve_device("auto"))
