"""`mindspeed train` whose rank 0 SIGKILLs itself inside the save of one iteration: every rank's
shards are in ``iter_N.tmp`` but the commit (the rename to ``iter_N`` and the tracker update) has
not started. Run by torchrun as a script (no library change)::

    torchrun --nproc-per-node 2 tests/kill_during_save.py --kill-at-save 4 MINDSPEED-TRAIN FLAGS...
"""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--kill-at-save" or not argv[1].isdigit():
        raise SystemExit("kill_during_save.py: pass --kill-at-save ITERATION first, then the mindspeed train flags")
    kill_at, rest = int(argv[1]), argv[2:]
    from mindspeed_train import ckpt, launch

    commit = ckpt._commit

    def dying_commit(tmp: str, final: str, root: str, iteration: int) -> None:
        if iteration == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no Python handler: as the OOM killer does it
        commit(tmp, final, root, iteration)

    ckpt._commit = dying_commit
    return launch.main(rest)


# The guard matters: a checkpoint writer that starts processes by spawn re-imports this file.
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
