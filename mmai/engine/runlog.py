"""Per-epoch log of a run: RUN_DIR/log.jsonl (one JSON object per epoch) and, when the
``tensorboard`` package is installed, TensorBoard scalars in RUN_DIR/tensorboard/ and images of
a few validation overlays (:mod:`mmai.figures.tensorboard`, :meth:`RunLog.write_images`).

The JSONL file's byte length after each epoch is recorded in the checkpoint; a resumed run
truncates the file back to it, so an epoch whose line was written but whose checkpoint was not
committed appears once, not twice. TensorBoard events of such an epoch are purged likewise
(``purge_step``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mmai.errors import MmaiError

log = logging.getLogger(__name__)


class RunLog:
    """Append-only epoch log. ``enabled=False`` (ranks other than 0) makes every call a no-op."""

    def __init__(self, path: Path | None, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.enabled = enabled and self.path is not None
        self.want_tb = tensorboard
        self._tb: Any = None

    def start(self, position: int, first_epoch: int) -> None:
        """Begin logging at byte ``position`` of log.jsonl (0: a fresh run, truncating any old log)
        with ``first_epoch`` the next epoch to be written."""
        if not self.enabled or self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > position:
            with self.path.open("r+b") as fh:
                fh.truncate(position)
        elif position > 0 and (not self.path.exists() or self.path.stat().st_size < position):
            log.warning("%s is shorter than the checkpoint's log position %d; continuing after it", self.path,
                        position)
        if self.want_tb:
            tb = self.path.parent / "tensorboard"
            if first_epoch == 1 and tb.is_dir():  # a fresh run: drop an older run's events
                shutil.rmtree(tb)
            self._tb = _tensorboard_writer(tb, first_epoch)

    def position(self) -> int:
        """Byte length of log.jsonl now (0 when there is none or logging is disabled)."""
        if not self.enabled or self.path is None or not self.path.exists():
            return 0
        return self.path.stat().st_size

    def write(self, row: dict[str, Any]) -> None:
        """Append one epoch row (flushed to disk) and its scalars to TensorBoard."""
        if not self.enabled or self.path is None:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self._tb is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key,
                                        value, global_step=int(row["epoch"]))
            self._tb.flush()

    def write_images(self, epoch: int, make: Callable[[], dict[str, np.ndarray]]) -> None:
        """Images (tag -> (H, W, 3) uint8) of epoch ``epoch`` to TensorBoard; ``make`` is called only
        when TensorBoard is on. A figure that cannot be drawn is logged and skipped (training goes on)."""
        if not self.enabled or self._tb is None:
            return
        try:
            images = make()
        except (RuntimeError, ValueError, MmaiError) as exc:
            log.warning("epoch %d: validation overlays not drawn: %s: %s", epoch, type(exc).__name__, exc)
            return
        for tag, rgb in images.items():
            self._tb.add_image(tag, rgb, global_step=int(epoch), dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tensorboard_writer(folder: Path, first_epoch: int) -> Any:
    """A SummaryWriter purging events from ``first_epoch`` on (None without tensorboard)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.debug("tensorboard is not installed; logging to log.jsonl only")
        return None
    return SummaryWriter(log_dir=str(folder), purge_step=first_epoch if first_epoch > 1 else None)
