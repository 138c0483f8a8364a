"""Stopping cleanly: a stop signal finishes the current optimizer step, writes a checkpoint and ends the run.

SIGTERM (what SLURM and Kubernetes send before a kill), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's `--signal`)
set a flag; the loop asks `requested()` once per step, after the update. Under torchrun every process takes
part in that question (a max over a CPU process group, so no GPU sync), so all stop at the same step and
process 0 writes the checkpoint. A second SIGINT interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch

# Documented exit code of `ldmkit train` / `ldmkit recipe` after a signal stop (EX_TEMPFAIL: re-run to resume).
EXIT_STOPPED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class TrainingStopped(Exception):
    """The run stopped on a signal after writing a checkpoint."""

    def __init__(self, signal_name: str, images_seen: int, checkpoint: Path | None):
        super().__init__(
            f"stopped by {signal_name} at {images_seen:,} images; checkpoint {checkpoint} written: "
            "re-run the same command to resume"
        )
        self.checkpoint = checkpoint


class TrainingDiverged(ValueError):
    """Non-finite weights or too many non-finite gradients: nothing was saved past the last good checkpoint."""

    def __init__(self, images_seen: int, what: str, last_good: Path | None, run_dir: Path):
        if last_good is None:
            advice = "no checkpoint had been written yet: start again with a lower train.lr (or train.grad_clip)"
        else:
            advice = (
                f"the last good checkpoint is {last_good}; resume from it with a lower learning rate: "
                f"ldmkit train {run_dir} --resume --set train.lr=<lower>"
            )
        super().__init__(
            f"training diverged at {images_seen:,} images ({what}); nothing non-finite was saved; {advice}"
        )


class StopSignals:
    """Installs the stop handlers (main thread only) until restore()."""

    def __init__(self, d):
        self.d, self.name, self.previous = d, None, {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: do not wait for the step
        self.name = signal.Signals(signum).name

    def requested(self) -> bool:
        """Whether any process received a stop signal (a collective when several processes run)."""
        flag = self.name is not None
        if self.d.world_size > 1:
            import torch.distributed as dist

            t = torch.tensor([1 if flag else 0], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.d.cpu_group)
            flag = bool(t.item())
            if flag and self.name is None:
                self.name = "a stop signal on another process"
        return flag

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
