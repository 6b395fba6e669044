"""The resume tests' fault injection, outside the package: a process started with this folder on ``PYTHONPATH`` and
``PROCKD_KILL_AFTER_STEPS=N`` kills itself (SIGKILL) right after its N-th optimiser step, wherever that step is (a
fine-tune's stage 1, stage 2, one rank of a torchrun launch). Python imports ``sitecustomize`` at start-up; the
production loop knows nothing of it (tests/conftest.py: :func:`kill_after`)."""
import os

_N = int(os.environ.get("PROCKD_KILL_AFTER_STEPS", "0") or 0)
if _N:
    import signal

    import prockd.core.loop as _loop

    _real, _done = _loop.optimizer_step, [0]

    def _step_then_die(*args, **kwargs):
        _real(*args, **kwargs)
        _done[0] += 1
        if _done[0] >= _N:
            os.kill(os.getpid(), signal.SIGKILL)

    _loop.optimizer_step = _step_then_die
