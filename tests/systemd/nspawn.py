"""A real systemd in a container (systemd-nspawn) for the service tests, on a machine without Docker.

Builds a Debian rootfs once with debootstrap and caches it (ETL_TEST_CACHE, default
/var/cache/etl-service-tests), boots a throw-away copy of it (--ephemeral), and runs commands
inside with nsenter. The container shares the host's network, so it reaches the test's
PostgreSQL on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

CACHE = Path(os.environ.get("ETL_TEST_CACHE", "/var/cache/etl-service-tests"))
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,procps"


def missing_tools() -> str | None:
    """Why the systemd tests cannot run here (None: they can), installing the tools if root."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, debootstrap)"
    if not (shutil.which("systemd-nspawn") and shutil.which("debootstrap")):
        if not shutil.which("apt-get"):
            return "systemd-nspawn and debootstrap are missing and there is no apt-get to install them"
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
        done = subprocess.run(["apt-get", "install", "-y", "-qq", "systemd-container", "debootstrap"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            return f"could not install systemd-container and debootstrap: {done.stderr.strip()[-300:]}"
    if not Path("/sys/fs/cgroup").exists():
        return "no cgroup file system"
    return None


def rootfs() -> Path:
    """The cached Debian rootfs (built on first use, about a minute)."""
    root = CACHE / "rootfs-bookworm"
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(root),
                    "http://deb.debian.org/debian"], check=True, capture_output=True)
    (root / ".complete").touch()
    return root


def wheelhouse(repo: Path) -> Path:
    """Wheels for the project and every dependency, so the container installs offline."""
    house = CACHE / "wheelhouse"
    house.mkdir(parents=True, exist_ok=True)
    for old in house.glob("etl_service-*.whl"):
        old.unlink()
    with contextlib.chdir(repo):
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                        "--wheel-dir", str(house), "--find-links", str(house), ".[embedded]"], check=True,
                       capture_output=True)
    # the in-tree build leaves these behind
    shutil.rmtree(repo / "build", ignore_errors=True)
    return house


class Container:
    """A booted ephemeral container; `run()` executes a command inside it."""

    def __init__(self, root: Path, binds: dict[Path, str], log: Path) -> None:
        self.name = f"etltest{os.getpid()}"
        args = ["systemd-nspawn", "-D", str(root), "--ephemeral", "--boot", "--register=no", "--keep-unit",
                "--console=pipe", "-M", self.name]
        args += [f"--bind-ro={host}:{inside}" for host, inside in binds.items()]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True)
        self.leader = self._find_leader()
        self._wait_running()

    def _find_leader(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for child in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split():
                status = Path(f"/proc/{child}/status").read_text()
                nspid = next((ln for ln in status.splitlines() if ln.startswith("NSpid:")), "")
                if nspid.split()[-1:] == ["1"]:
                    return int(child)
            time.sleep(0.1)
        raise RuntimeError("the container's init did not appear")

    def _wait_running(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the container did not finish booting: {state}")

    def run(self, *command: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["nsenter", "-t", str(self.leader), "-a", *command], capture_output=True, text=True,
                              timeout=timeout, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "-P", prop, unit).stdout.strip()

    def close(self) -> None:
        self.run("systemctl", "poweroff", check=False, timeout=30)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader, 9)  # ends the whole container; never kill nspawn first
            self.proc.wait(timeout=30)
        _remove_empty_cgroups()


def _remove_empty_cgroups() -> None:
    """nspawn leaves empty payload/supervisor cgroup folders behind on this kind of host.

    (With the container's own empty folders inside, such as payload/init.scope: those go first.
    A cgroup that still has a process cannot be removed, so a running container keeps its own.)
    """
    for base in (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified")):
        if not base.exists():
            continue
        for folder in sorted(base.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir() and {"payload", "supervisor"} & set(folder.relative_to(base).parts):
                with contextlib.suppress(OSError):
                    folder.rmdir()


@contextlib.contextmanager
def booted(binds: dict[Path, str], log: Path) -> Iterator[Container]:
    container = Container(rootfs(), binds, log)
    try:
        yield container
    finally:
        container.close()
