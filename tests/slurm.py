"""A real Slurm for tests: munged, slurmctld and slurmd (one node by default, or several
nodes on this host, a slurmd each; and, on request, MariaDB + slurmdbd for accounting)
started as root from a temp dir.

Debian's slurm-wlm (22.05) starts here in about a second with:
``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none`` (no cgroup set-up
needed, so it works inside the test suite's PID namespace and in containers),
``SlurmctldHost=<hostname>(127.0.0.1)``, free loopback ports, and a munged of its own
whose socket directory is mode 0755 (munged refuses group/world-writable directories).
Clients (sbatch, squeue, scontrol, sacct, sacctmgr) find the cluster through
``SLURM_CONF``: ``SlurmCluster.env()`` gives an environment with it set.

Everything runs as root (SlurmUser=root); jobs run as the submitting user, or as
another user with ``sbatch --uid`` (root only). A failed start raises ``ServerError``
with the tail of the daemons' logs. ``require_binary`` (tests/servers.py) decides what
a missing binary does: skip, or fail under ``CI=true``.

Accounting (``SlurmAccounting``): a MariaDB server (``mariadbd``) on a Unix socket
and a free TCP port in the temp dir, initialised with ``mariadb-install-db``, and
slurmdbd storing into it; slurmctld then uses
``AccountingStorageType=accounting_storage/slurmdbd``. It takes a few seconds more,
so only tests that need ``sacct`` / ``sacctmgr`` ask for it.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from servers import LOOPBACK, ServerError, _Process, require_binary

# binary -> Debian package that ships it (extends servers.DEBIAN_PACKAGES)
SLURM_PACKAGES = {
    "munged": "munge", "slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-client",
    "slurmdbd": "slurmdbd", "mariadbd": "mariadb-server", "mariadb-install-db": "mariadb-server",
}
START_TIMEOUT_S = 30.0
NODE_PREFIX = "wpn"  # names of the Slurm nodes of a several-node cluster: wpn1, wpn2, ...


def slurm_binary(name: str) -> str:
    """``require_binary`` with the Debian package named in the message."""
    import servers

    servers.DEBIAN_PACKAGES.update(SLURM_PACKAGES)
    return require_binary(name)


def _wait(what: str, check: Any, timeout: float, logs: list[_Process]) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            last = str(exc)
        dead = [p for p in logs if not p.alive()]
        if dead:
            break
        time.sleep(0.05)
    tails = "\n".join(f"--- {p.name} log ---\n{p.log_tail()}" for p in logs)
    raise ServerError(f"{what} not ready within {timeout:.0f} s ({last})\n{tails}")


# Runs argv[1:] as its child with PR_SET_CHILD_SUBREAPER set, reaps every orphan of
# that subtree, forwards SIGTERM/SIGINT, and exits with the child's status.
_SUBREAPER = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
child = os.fork()
if child == 0:
    os.execv(sys.argv[1], sys.argv[1:])
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda s, f: os.kill(child, s))
while True:
    pid, status = os.wait()
    if pid == child:
        sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


class _EnvProcess(_Process):
    """``_Process`` with an environment of its own."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        super().__init__(name, argv, log_path)
        self.env = env

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)


class Munge:
    """munged on a socket in ``base_dir/run`` (mode 0755) with a fresh key."""

    def __init__(self, base_dir: Path) -> None:
        self.dir = Path(base_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        run = self.dir / "run"
        run.mkdir(mode=0o755, exist_ok=True)
        os.chmod(run, 0o755)
        self.key = self.dir / "munge.key"
        self.key.write_bytes(secrets.token_bytes(1024))
        os.chmod(self.key, 0o400)
        self.socket = run / "munge.socket"
        argv = [slurm_binary("munged"), "--foreground", "--force", f"--socket={self.socket}",
                f"--key-file={self.key}", f"--pid-file={run / 'munged.pid'}",
                f"--seed-file={self.dir / 'munged.seed'}", f"--log-file={self.dir / 'munged.log'}",
                "--num-threads=2"]
        self.process = _Process("munged", argv, self.dir / "munged.out")

    def start(self) -> None:
        self.process.start()
        _wait("munged", self.socket.exists, START_TIMEOUT_S, [self.process])

    def stop(self) -> None:
        self.process.stop()


_SLURM_CONF = """\
# Written by tests/slurm.py: one node, loopback only, everything in {dir}.
ClusterName={cluster}
SlurmctldHost={host}({addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/run/slurmctld.pid
SlurmdPidFile={dir}/run/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=none
SchedulerType={scheduler}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=2
Waittime=0
MessageTimeout=10
# The node's CPUs as configured, not as detected: tests need a few (srun -n2, arrays).
SlurmdParameters=config_overrides
{accounting}
{extra}
{node_lines}
PartitionName={partition} Nodes={node_names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
"""


class SlurmCluster:
    """slurmctld + slurmd (+ munged) for one node named after this host.

    ``extra_conf``: more slurm.conf lines (TaskEpilog=..., Prolog=...).
    ``accounting``: a started ``SlurmAccounting`` to store jobs in.
    ``nodes``: more than 1 gives that many Slurm nodes on this host, ``<prefix>1`` ..
    ``<prefix>N`` (``NODE_PREFIX``), each a slurmd of its own (``slurmd -N <name>``)
    on a port of its own (``NodeHostname`` this host): multi-node jobs
    (``SLURM_JOB_NODELIST=wpn[1-2]``) and heterogeneous jobs, whose components
    Slurm 22.05 never places on one node (measured: the backfill scheduler plans the
    second component after the first ends), run for real.
    ``scheduler``: ``SchedulerType`` (heterogeneous jobs need ``sched/backfill``;
    ``SchedulerParameters=bf_interval=1`` then starts them within a second or two).
    """

    def __init__(self, base_dir: Path, *, extra_conf: str = "", accounting: "SlurmAccounting | None" = None,
                 munge: Munge | None = None, partition: str = "gpu", ctld_env: dict[str, str] | None = None,
                 nodes: int = 1, scheduler: str = "sched/builtin") -> None:
        self.dir = Path(base_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)  # jobs of other users write their output here
        self.host = socket.gethostname().split(".")[0]
        # Slurm's node names: this host's name for one node, else wpn1 .. wpnN on this host.
        self.nodes = [self.host] if nodes <= 1 else [f"{NODE_PREFIX}{i}" for i in range(1, nodes + 1)]
        for sub in ("state", "spool", "run", *(f"spool/{n}" for n in self.nodes)):
            (self.dir / sub).mkdir(exist_ok=True)
        # Scripts, working directory and output of jobs of any user. Jobs of other users
        # also need the spool and munge directories: ``base_dir`` and its parents must
        # be searchable by all (pytest's tmp_path is not: see ``public_dir``).
        self.jobs_dir = self.dir / "jobs"
        self.jobs_dir.mkdir(exist_ok=True)
        os.chmod(self.jobs_dir, 0o1777)
        self.partition = partition
        self.cluster = "wpt" + secrets.token_hex(3)
        self.munge = munge or Munge(self.dir / "munge")
        self._own_munge = munge is None
        self.accounting = accounting
        self.conf = self.dir / "slurm.conf"
        acct = ""
        if accounting is not None:
            acct = (f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost={LOOPBACK}\n"
                    f"AccountingStoragePort={accounting.dbd_port}\nAccountingStoragePass={self.munge.socket}\n"
                    "AccountingStorageEnforce=associations\nJobCompType=jobcomp/none")
        ports = distinct_ports(1 + len(self.nodes))
        cpus = max(4, os.cpu_count() or 1)
        if nodes <= 1:
            node_lines = f"NodeName={self.host} NodeAddr={LOOPBACK} CPUs={cpus} RealMemory=1000 State=UNKNOWN"
            node_names = self.host
        else:
            node_lines = "\n".join(f"NodeName={n} NodeHostname={self.host} NodeAddr={LOOPBACK} Port={port} CPUs={cpus} "
                                   "RealMemory=1000 State=UNKNOWN" for n, port in zip(self.nodes, ports[1:]))
            node_names = f"{NODE_PREFIX}[1-{len(self.nodes)}]"
        self.conf.write_text(_SLURM_CONF.format(
            dir=self.dir, cluster=self.cluster, host=self.host, addr=LOOPBACK, ctld_port=ports[0],
            slurmd_port=ports[1], munge_socket=self.munge.socket, node_lines=node_lines, node_names=node_names,
            scheduler=scheduler, partition=partition, accounting=acct, extra=extra_conf))
        os.chmod(self.conf, 0o644)
        self.ctld = _EnvProcess("slurmctld", [slurm_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)],
                                self.dir / "slurmctld.out", env=self.env({**os.environ, **(ctld_env or {})}))
        # Under a subreaper: slurmstepd detaches from slurmd, and in the test suite's PID
        # namespace its init is pytest, which never reaps orphans; their zombies would
        # look like live job processes.
        self.slurmds = [_Process(f"slurmd {n}", [sys.executable, "-c", _SUBREAPER, slurm_binary("slurmd"), "-D", "-f",
                                                 str(self.conf), "-N", n], self.dir / f"slurmd-{n}.out")
                        for n in self.nodes]
        self.slurmd = self.slurmds[0]
        for client in ("sbatch", "squeue", "scontrol", "srun"):
            slurm_binary(client)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for Slurm clients: ``SLURM_CONF`` set, no inherited job variables."""
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "WATTPRINT_JOB"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *argv: str, check: bool = True, timeout: float = 30.0, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command with ``SLURM_CONF`` set."""
        done = subprocess.run(list(argv), env=kw.pop("env", None) or self.env(), capture_output=True, text=True,
                              timeout=timeout, **kw)
        if check and done.returncode != 0:
            raise ServerError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}\n{self.log_tails()}")
        return done

    def log_tails(self) -> str:
        parts = [self.munge.process, self.ctld, *self.slurmds]
        out = [f"--- {p.name} ---\n{p.log_tail()}" for p in parts]
        for name in ("slurmctld.log", *(f"slurmd-{n}.log" for n in self.nodes)):
            try:
                out.append(f"--- {name} ---\n" + "\n".join((self.dir / name).read_text(errors="replace").splitlines()[-30:]))
            except OSError:
                pass
        return "\n".join(out)

    def _node_idle(self) -> bool:
        done = self.run("sinfo", "-h", "-N", "-o", "%t", check=False, timeout=10)
        states = done.stdout.split()
        return (done.returncode == 0 and len(states) == len(self.nodes)
                and all(s in ("idle", "mix", "alloc") for s in states))

    def start(self) -> None:
        if self._own_munge:
            self.munge.start()
        self.ctld.start()
        for slurmd in self.slurmds:
            slurmd.start()
        try:
            _wait("slurm node", self._node_idle, START_TIMEOUT_S, [self.munge.process, self.ctld, *self.slurmds])
        except ServerError as exc:
            self.stop()
            raise ServerError(f"{exc}\n{self.log_tails()}") from None

    def stop(self) -> None:
        # Cancel what still runs, so slurmd does not leave job processes behind.
        if self.ctld.alive():
            self.run("scancel", "--full", "-u", "root", check=False, timeout=10)
            for uid_name in ("nobody",):
                self.run("scancel", "--full", "-u", uid_name, check=False, timeout=10)
        for slurmd in self.slurmds:
            slurmd.stop()
        self.ctld.stop()
        if self._own_munge:
            self.munge.stop()


    # -- jobs ---------------------------------------------------------------------------
    def sbatch(self, script: str, *args: str, env: dict[str, str] | None = None) -> str:
        """Submit ``script`` (text) with sbatch; returns the job id (for an array, the
        array's job id)."""
        path = self.jobs_dir / f"job-{secrets.token_hex(4)}.sh"
        path.write_text(script)
        os.chmod(path, 0o755)
        done = self.run("sbatch", "--parsable", f"--chdir={self.jobs_dir}", f"--output={self.jobs_dir}/slurm-%j.out",
                        *args, str(path), env=env)
        return done.stdout.strip().split(";")[0]

    def job_record(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o JOB`` as a dict of Key=Value (for an array, its first task)."""
        done = self.run("scontrol", "show", "job", "-o", job_id)
        return parse_scontrol(done.stdout.splitlines()[0])

    def job_records(self, job_id: str) -> list[dict[str, str]]:
        done = self.run("scontrol", "show", "job", "-o", job_id)
        return [parse_scontrol(line) for line in done.stdout.splitlines() if line.strip()]

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float = 60.0) -> list[dict[str, str]]:
        """Poll until every record of ``job_id`` (all tasks of an array) is in one of ``states``."""
        deadline = time.monotonic() + timeout
        records: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            records = self.job_records(job_id)
            if records and all(r.get("JobState") in states for r in records):
                return records
            time.sleep(0.1)
        raise ServerError(f"job {job_id} not in {states} within {timeout:.0f} s: "
                          f"{[r.get('JobState') for r in records]}\n{self.log_tails()}")


def distinct_ports(n: int) -> list[int]:
    """``n`` different free loopback ports, outside the ephemeral range (where
    ``free_port`` may hand out the same port twice in a row, and where outgoing
    connections take their ports)."""
    ports: list[int] = []
    while len(ports) < n:
        port = random.randrange(20000, 32000)
        if port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
        ports.append(port)
    return ports


def public_dir(prefix: str = "wattprint-slurm-") -> Path:
    """A new directory under the system temp dir, mode 0755 (its parents are
    searchable by all), for a cluster whose jobs run as other users; the caller
    removes it (``shutil.rmtree``)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    return path


def parse_scontrol(line: str) -> dict[str, str]:
    """``Key=Value Key2=Value two ...`` of ``scontrol show -o``: a value runs to the next
    `` Key=`` (values such as Comment may contain spaces)."""
    out: dict[str, str] = {}
    key = None
    for word in line.strip().split(" "):
        head, eq, rest = word.partition("=")
        if eq and head and head.replace("/", "").replace(":", "").isalnum() and head[0].isupper():
            key = head
            out[key] = rest
        elif key is not None:
            out[key] += " " + word
    return {k: v.strip() for k, v in out.items()}


# --------------------------------------------------------------------------- accounting

_MARIADB_CNF = """\
[mysqld]
datadir={dir}/data
socket={dir}/mysqld.sock
port={port}
bind-address={addr}
pid-file={dir}/mysqld.pid
log-error={dir}/mysqld.err
skip-name-resolve
innodb_buffer_pool_size=32M
innodb_log_file_size=8M
innodb_flush_log_at_trx_commit=0
performance_schema=off
skip-log-bin
user=root
"""

_SLURMDBD_CONF = """\
AuthType=auth/munge
AuthInfo=socket={munge_socket}
DbdHost=localhost
DbdAddr={addr}
DbdPort={dbd_port}
SlurmUser=root
PidFile={dir}/slurmdbd.pid
LogFile={dir}/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost={addr}
StorageLoc=slurm_acct
StorageUser=root
StoragePort={db_port}
"""


class SlurmAccounting:
    """MariaDB + slurmdbd in ``base_dir``; pass it to ``SlurmCluster(accounting=...)``
    and call ``register(cluster)`` after the cluster started (adds the cluster, an
    account and the users to the database)."""

    def __init__(self, base_dir: Path, munge: Munge) -> None:
        self.dir = Path(base_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.munge = munge
        self.db_port, self.dbd_port = distinct_ports(2)
        self.cnf = self.dir / "my.cnf"
        self.cnf.write_text(_MARIADB_CNF.format(dir=self.dir, port=self.db_port, addr=LOOPBACK))
        self.install_db = slurm_binary("mariadb-install-db")
        self.mariadbd = _Process("mariadbd", [slurm_binary("mariadbd"), f"--defaults-file={self.cnf}"],
                                 self.dir / "mariadbd.out")
        self.dbd_conf = self.dir / "slurmdbd.conf"
        self.dbd_conf.write_text(_SLURMDBD_CONF.format(munge_socket=munge.socket, addr=LOOPBACK,
                                                       dbd_port=self.dbd_port, dir=self.dir, db_port=self.db_port))
        os.chmod(self.dbd_conf, 0o600)  # slurmdbd refuses a config others can read (it may hold a password)
        self.slurmdbd = _Process("slurmdbd", [slurm_binary("slurmdbd"), "-D", "-s"], self.dir / "slurmdbd.out")

    def _sql_ready(self) -> bool:
        return (self.dir / "mysqld.sock").exists()

    def _dbd_ready(self) -> bool:
        with socket.create_connection((LOOPBACK, self.dbd_port), timeout=1):
            return True

    def start(self) -> None:
        done = subprocess.run([self.install_db, f"--defaults-file={self.cnf}", "--auth-root-authentication-method=normal",
                               "--skip-test-db", f"--datadir={self.dir / 'data'}"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise ServerError(f"mariadb-install-db failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        self.mariadbd.start()
        _wait("mariadbd", self._sql_ready, 60.0, [self.mariadbd])
        self.slurmdbd.argv = [*self.slurmdbd.argv]
        env = dict(os.environ, SLURM_CONF=str(self.dir / "slurm.conf-for-dbd"))
        # slurmdbd reads slurmdbd.conf from the directory of SLURM_CONF.
        (self.dir / "slurm.conf-for-dbd").write_text("")
        self._start_dbd(env)
        _wait("slurmdbd", self._dbd_ready, START_TIMEOUT_S, [self.mariadbd, self.slurmdbd])

    def _start_dbd(self, env: dict[str, str]) -> None:
        with open(self.slurmdbd.log_path, "ab") as log:
            self.slurmdbd.proc = subprocess.Popen(self.slurmdbd.argv, stdin=subprocess.DEVNULL, stdout=log,
                                                  stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def register(self, cluster: SlurmCluster, users: tuple[str, ...] = ("root", "nobody")) -> None:
        """Add the cluster, an account ``wattprint`` and ``users`` to the database."""
        cluster.run("sacctmgr", "-i", "add", "cluster", cluster.cluster, check=False)
        cluster.run("sacctmgr", "-i", "add", "account", "wattprint", f"cluster={cluster.cluster}")
        for user in users:
            cluster.run("sacctmgr", "-i", "add", "user", user, "account=wattprint", f"cluster={cluster.cluster}")

    def stop(self) -> None:
        self.slurmdbd.stop()
        self.mariadbd.stop()

    def log_tails(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_tail()}" for p in (self.mariadbd, self.slurmdbd))


def sacct(cluster: SlurmCluster, job_id: str, fields: str) -> list[dict[str, str]]:
    """``sacct -j JOB -X -P -o fields`` as dicts."""
    done = cluster.run("sacct", "-j", job_id, "-X", "-P", "-n", "-o", fields)
    names = fields.split(",")
    return [dict(zip(names, line.split("|"))) for line in done.stdout.splitlines() if line.strip()]


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)
