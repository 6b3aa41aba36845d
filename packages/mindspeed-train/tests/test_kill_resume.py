"""kill -9 of a real `torchrun ... -m mindspeed_train.launch` job (2 gloo ranks on CPU), then resume.

(a) DP=2 with the distributed optimizer: the whole job (torchrun's agent and both workers) is
SIGKILLed as soon as its metrics show iteration 5; wherever that lands (a later step, or inside a
save, leaving an ``iter_N.tmp``), resuming from the tracker's checkpoint must reproduce an
uninterrupted reference run's steps after it (loss, grad norm, lr, data position).
(b) TP=2: rank 0 SIGKILLs itself inside the save of iteration 4, once every shard is written but
before the commit (``tests/kill_during_save.py``); the ``.tmp`` must never load: the resume starts
after step 2 and reproduces the reference's steps 3 onwards, and its own save of step 4 replaces the
debris.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import train_helpers as th

from mindspeed_train.ckpt import TRACKER

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]
HERE = os.path.dirname(os.path.abspath(__file__))
ITERS, INTERVAL, KILL_AT = 10, 2, 5  # (a) kills once iteration KILL_AT is logged; 10 leaves room to land before the end
KEYS = ("loss", "grad_norm", "lr", "consumed_samples")
RUN_TIMEOUT_S = 150


def _command(argv: list[str], script: tuple[str, ...] = ()) -> list[str]:
    """torchrun with 2 local ranks; a free rendezvous port (--standalone) so parallel jobs never collide."""
    entry = [os.path.join(HERE, script[0]), *script[1:]] if script else ["-m", "mindspeed_train.launch"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *entry, *argv]


def _start(cmd: list[str], log: str) -> subprocess.Popen:
    # A session of its own: killpg reaches the agent without touching pytest.
    with open(log, "w") as handle:
        return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def _tail(log: str, lines: int = 30) -> str:
    text = [line for line in open(log).read().splitlines() if "warn" not in line.lower()]
    return "\n".join(text[-lines:])


def _wait(proc: subprocess.Popen, log: str) -> int:
    try:
        return proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_job(proc, _workers(proc.pid))
        pytest.fail(f"torchrun hung for {RUN_TIMEOUT_S} s; log tail:\n{_tail(log)}")


def _run(argv: list[str], log: str, script: tuple[str, ...] = ()) -> int:
    return _wait(_start(_command(argv, script), log), log)


def _workers(agent: int) -> list[int]:
    """Children of torchrun's agent: the ranks. torchrun starts each in a session of its own, so
    killing the agent's process group alone leaves them training as orphans."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == agent:
            found.append(int(entry))
    return found


def _gone(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _kill_job(agent: subprocess.Popen, workers: list[int]) -> None:
    """SIGKILL every rank's process group (a rank's helpers included), then the agent's; wait until
    all are dead, so nothing still writes into the checkpoint directory when the resume starts."""
    for pid in workers:
        try:
            group = os.getpgid(pid)
            if group == os.getpgrp():  # never our own group (pytest's)
                os.kill(pid, signal.SIGKILL)
            else:
                os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(agent.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    agent.wait(timeout=30)
    deadline = time.monotonic() + 30
    while not all(_gone(pid) for pid in workers):
        assert time.monotonic() < deadline, f"ranks {workers} survived SIGKILL"
        time.sleep(0.01)


def _last_iteration(out: str) -> int:
    try:
        text = open(os.path.join(out, "metrics.jsonl")).read()
    except FileNotFoundError:
        return 0
    lines = text.split("\n")[:-1]  # a line without its newline is still being written
    return json.loads(lines[-1])["iteration"] if lines else 0


def _kill_at(agent: subprocess.Popen, out: str, iteration: int, log: str) -> None:
    """Poll the metrics; SIGKILL the whole job as soon as ``iteration`` is logged."""
    workers: list[int] = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while _last_iteration(out) < iteration:
        if agent.poll() is not None:
            pytest.fail(f"the run ended (rc {agent.returncode}) before iteration {iteration}; log tail:\n{_tail(log)}")
        if time.monotonic() > deadline:
            _kill_job(agent, _workers(agent.pid))
            pytest.fail(f"no iteration {iteration} within {RUN_TIMEOUT_S} s; log tail:\n{_tail(log)}")
        if len(workers) < 2 and _last_iteration(out) > 0:  # both ranks are up once a step is logged
            workers = _workers(agent.pid)
        time.sleep(0.002)
    _kill_job(agent, workers or _workers(agent.pid))
    if agent.returncode != -signal.SIGKILL:
        pytest.fail(f"the run ended (rc {agent.returncode}) before the kill landed: too slow to catch it before "
                    f"iteration {ITERS}; log tail:\n{_tail(log)}")  # fmt: skip


def _assert_same_steps(got: list[dict], want: list[dict], what: str) -> None:
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want], what
    for mine, ref in zip(got, want, strict=True):
        for key in KEYS:
            # Bitwise: same code, same layout, one thread per rank; any drift means some state was not restored.
            assert mine[key] == ref[key], (what, key, mine, ref)


def _tracker(ck: str) -> int:
    return int(open(os.path.join(ck, TRACKER)).read())


def _reference(root: str, extra: tuple[str, ...]) -> list[dict]:
    """An uninterrupted run (saving every INTERVAL too: same code path as the killed one)."""
    out, ck = os.path.join(root, "reference"), os.path.join(root, "reference_ck")
    log = os.path.join(root, "reference.log")
    argv = th.flags(root, out, iters=ITERS, extra=("--save", ck, "--save-interval", str(INTERVAL), *extra))
    assert _run(argv, log) == 0, _tail(log)
    steps = th.read(out)
    assert [r["iteration"] for r in steps] == list(range(1, ITERS + 1))
    assert steps[0]["loss"] != steps[-1]["loss"]
    return steps


def _resume(root: str, ck: str, extra: tuple[str, ...]) -> list[dict]:
    out, log = os.path.join(root, "resumed"), os.path.join(root, "resumed.log")
    argv = th.flags(root, out, iters=ITERS, extra=("--save", ck, "--save-interval", str(INTERVAL), "--load", ck, *extra))
    assert _run(argv, log) == 0, _tail(log)
    # The resumed run re-saved every checkpoint after the one it loaded: no .tmp debris is left.
    names = sorted(name for name in os.listdir(ck) if name.startswith("iter_"))
    assert names == [f"iter_{it:07d}" for it in range(INTERVAL, ITERS + 1, INTERVAL)], names
    assert _tracker(ck) == ITERS
    return th.read(out)


def test_kill_9_during_training_then_resume_matches_the_uninterrupted_run(tmp_path):
    root = str(tmp_path)
    th.prepare(root)
    extra = ("--use-distributed-optimizer",)  # DP=2: Adam state sharded over the two ranks
    reference = _reference(root, extra)
    out, ck, log = os.path.join(root, "killed"), os.path.join(root, "ck"), os.path.join(root, "killed.log")
    argv = th.flags(root, out, iters=ITERS, extra=("--save", ck, "--save-interval", str(INTERVAL), *extra))
    _kill_at(_start(_command(argv), log), out, KILL_AT, log)
    killed = th.read(out)
    died_after = killed[-1]["iteration"]
    assert KILL_AT <= died_after < ITERS, died_after
    _assert_same_steps(killed, reference[:died_after], "killed run before the kill")
    # The save of every step before KILL_AT was committed before KILL_AT started; a kill inside a later
    # save leaves only iter_N.tmp, and the tracker still names the previous checkpoint.
    loaded = _tracker(ck)
    assert loaded % INTERVAL == 0 and (KILL_AT - 1) // INTERVAL * INTERVAL <= loaded <= died_after, (loaded, died_after)
    resumed = _resume(root, ck, extra)
    _assert_same_steps(resumed, reference[loaded:], f"resumed from iteration {loaded} (killed after {died_after})")


def test_kill_9_inside_a_checkpoint_save_is_never_loaded(tmp_path):
    root = str(tmp_path)
    th.prepare(root)
    extra = ("--tensor-model-parallel-size", "2")
    reference = _reference(root, extra)
    out, ck, log = os.path.join(root, "killed"), os.path.join(root, "ck"), os.path.join(root, "killed.log")
    argv = th.flags(root, out, iters=ITERS, extra=("--save", ck, "--save-interval", str(INTERVAL), *extra))
    rc = _run(argv, log, script=("kill_during_save.py", "--kill-at-save", "4"))
    assert rc != 0, f"the save of iteration 4 should have been killed; log tail:\n{_tail(log)}"
    assert "SIGKILL" in open(log).read(), _tail(log)  # torchrun's summary: rank 0 died of signal 9
    _assert_same_steps(th.read(out), reference[:4], "killed run")
    assert sorted(os.listdir(ck)) == ["hf_config", "iter_0000002", "iter_0000004.tmp", TRACKER]
    # every shard made it into the .tmp (metadata too): only the commit is missing, and that is enough
    assert os.path.isfile(os.path.join(ck, "iter_0000004.tmp", "metadata.json"))
    assert _tracker(ck) == 2
    resumed = _resume(root, ck, extra)
    _assert_same_steps(resumed, reference[2:], "resumed after the killed save")
