"""Real processes for the tests: the one process-spawning helper of the suite.

``Processes`` starts processes the way the daemon meets jobs: each one (by default) in
a session and process group of its own, with a clean environment (no ``WATTPRINT_*``
or ``SLURM_*`` variable of the test runner leaks into it) plus the label variable and
the extras the test gives; optionally as another uid (supplementary groups dropped) or
inside a cgroup v2 directory from its first instruction. ``close()`` kills every one,
its whole process group when it leads one, and reaps it.

The fixtures ``labelled_process`` (per test) and ``labelled_process_module`` (per test
module) in tests/conftest.py hand out a ``Processes``; test files never spawn job
processes of their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Callable, Mapping, Sequence

SLEEP_CODE = "import time; time.sleep(600)"
STRIPPED_PREFIXES = ("WATTPRINT_", "SLURM_")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test runner's environment without any ``WATTPRINT_*`` or ``SLURM_*`` variable
    (a job must carry only the labels the test gives it), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(STRIPPED_PREFIXES)}
    env.update(extra or {})
    return env


class Processes:
    """Call to start a process; ``end(p)`` kills one now; ``close()`` kills them all.

    ``labelled_process("train")`` starts ``python -c 'sleep 600'`` with
    ``WATTPRINT_JOB=train``. Keywords:

    - ``variable``: the label variable (default ``WATTPRINT_JOB``); ``label=None``: no label;
    - ``code``: Python source to run instead of the sleep; ``argv``: a whole command line
      instead (``argv`` wins; ``args`` are appended to the ``python -c code`` command);
    - ``env``: more variables (set after the label);
    - ``uid``: run as this uid and gid, supplementary groups dropped (the default
      command is then ``sleep 600``: the interpreter may live where that uid cannot read);
    - ``cgroup``: a cgroup v2 directory the process joins before it runs its command;
    - ``new_session``: False keeps it in the test's session and process group (it is
      then killed alone, never its group);
    - ``quiet``: stdout and stderr to /dev/null.
    """

    def __init__(self) -> None:
        self.started: list[tuple[subprocess.Popen, bool]] = []

    def __call__(self, label: str | None = None, *, variable: str = "WATTPRINT_JOB", code: str | None = None,
                 argv: Sequence[str] | None = None, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 uid: int | None = None, cgroup: str | os.PathLike[str] | None = None, new_session: bool = True,
                 quiet: bool = False) -> subprocess.Popen:
        full_env = clean_env({variable: label} if label is not None else None)
        full_env.update(env or {})
        if argv is not None:
            command = list(argv)
        elif uid is not None and code is None:
            command = ["sleep", "600"]
        else:
            command = [sys.executable, "-c", code or SLEEP_CODE, *args]
        p = subprocess.Popen(command, env=full_env, start_new_session=new_session,
                             preexec_fn=_preexec(uid, cgroup),
                             stdout=subprocess.DEVNULL if quiet else None,
                             stderr=subprocess.DEVNULL if quiet else None)
        self.started.append((p, new_session))
        return p

    def end(self, p: subprocess.Popen) -> None:
        """Kill ``p`` now (its whole group when it leads one) and reap it."""
        own_group = next((group for q, group in self.started if q is p), True)
        _kill(p, own_group)

    def close(self) -> None:
        for p, own_group in self.started:
            _kill(p, own_group)
        self.started.clear()


def _preexec(uid: int | None, cgroup: str | os.PathLike[str] | None) -> Callable[[], None] | None:
    if uid is None and cgroup is None:
        return None

    def run_in_child() -> None:
        if cgroup is not None:  # first, while still root: join the cgroup ("0" is the writer itself)
            with open(os.path.join(os.fspath(cgroup), "cgroup.procs"), "w") as fh:
                fh.write("0")
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    return run_in_child


def _kill(p: subprocess.Popen, own_group: bool) -> None:
    try:
        if own_group:
            os.killpg(p.pid, signal.SIGKILL)
        else:
            p.kill()
    except ProcessLookupError:
        pass
    except PermissionError:  # its group was taken over by another uid's process: kill it alone
        p.kill()
    p.wait()
