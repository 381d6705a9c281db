"""``python killer.py EPOCH mmai-args...``: run ``mmai`` and SIGKILL this process right after the
checkpoint commit of EPOCH completes (the first time a commit of that epoch is made)."""

import os
import signal
import sys

from mmai.engine import checkpoint

_commit = checkpoint.CheckpointStore.commit


def _commit_then_die(self, epoch, tensors, state):  # noqa: ANN001, ANN202
    _commit(self, epoch, tensors, state)
    if epoch == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)


checkpoint.CheckpointStore.commit = _commit_then_die

if __name__ == "__main__":
    from mmai.cli import main

    sys.exit(main(sys.argv[2:]))
