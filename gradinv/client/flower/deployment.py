"""The embedded app on Flower's Deployment Engine, all on 127.0.0.1: one SuperLink, one
SuperNode per client (node config `partition-id=K`), and `flwr run` of an app folder whose
components are gradinv.client.flower.apps' server_app (with the recorder) and client_app.
Every process is stopped on the way out, whatever happened."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from gradinv.errors import UserError

HOST = "127.0.0.1"
COMPONENTS = {"serverapp": "gradinv.client.flower.apps:server_app", "clientapp": "gradinv.client.flower.apps:client_app"}


@dataclass
class Deployment:
    work_dir: Path
    control: str       # the address `flwr run` submits to
    environment: dict  # FLWR_HOME and PATH for the Flower commands


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _wait_for(port: int, process: subprocess.Popen, what: str, log: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserError(f"the {what} stopped at start (exit code {process.returncode}); see {log}.")
        with socket.socket() as probe:
            if probe.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise UserError(f"the {what} did not open {HOST}:{port} within {seconds:.0f} s; see {log}.")


def _stop(processes: list[subprocess.Popen]) -> None:
    """Each process with what it started (the SuperLink and SuperNodes start SuperExec processes):
    every one leads its own process group."""
    def signal_group(process: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass

    for process in processes:
        signal_group(process, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        signal_group(process, signal.SIGKILL)
        process.wait()
        _wait_until_gone(process.pid)


def _wait_until_gone(group: int, seconds: float = 10) -> None:
    """SIGKILL is delivered asynchronously: the group's other members may outlive the leader briefly."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


@contextmanager
def local_deployment(work_dir: str | Path, clients: int) -> Iterator[Deployment]:
    """A SuperLink and `clients` SuperNodes on 127.0.0.1, stopped when the block ends."""
    work_dir = Path(work_dir).resolve()
    (work_dir / "flwr-home").mkdir(parents=True, exist_ok=True)
    fleet, control, serverappio = free_port(), free_port(), free_port()
    environment = {**os.environ, "FLWR_HOME": str(work_dir / "flwr-home"),
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    (work_dir / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "gradinv"\n\n[superlink.gradinv]\naddress = "{HOST}:{control}"\ninsecure = true\n')
    processes: list[subprocess.Popen] = []

    def start(name: str, command: list[str]) -> subprocess.Popen:
        log = open(work_dir / f"{name}.log", "w")  # noqa: SIM115 - the process owns it until it stops
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment,
                                          cwd=work_dir, start_new_session=True))
        return processes[-1]

    try:
        link = start("superlink", ["flower-superlink", "--insecure", "--database", ":flwr-in-memory:",
                                   "--fleet-api-address", f"{HOST}:{fleet}", "--control-api-address", f"{HOST}:{control}",
                                   "--serverappio-api-address", f"{HOST}:{serverappio}"])
        _wait_for(control, link, "SuperLink", work_dir / "superlink.log")
        for client in range(clients):
            start(f"supernode-{client}", ["flower-supernode", "--insecure", "--superlink", f"{HOST}:{fleet}",
                                          "--clientappio-api-address", f"{HOST}:{free_port()}",
                                          "--node-config", f"partition-id={client} num-partitions={clients}"])
        yield Deployment(work_dir, f"{HOST}:{control}", environment)
    finally:
        _stop(processes)


def app_folder(folder: str | Path, settings: dict) -> Path:
    """The Flower app folder `flwr run` bundles: its components and the run config."""
    import tomli_w

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    project = {"build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
               "project": {"name": "gradinv-federation", "version": "1.0.0", "description": "gradinv's embedded federation",
                           "license": "Apache-2.0", "dependencies": []},
               "tool": {"flwr": {"app": {"publisher": "gradinv", "components": COMPONENTS, "config": settings}}}}
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project))
    return folder


def run_on_deployment(settings: dict, work_dir: str | Path, timeout: float = 1800) -> None:
    """The embedded federation under the Deployment Engine; the recorder writes settings['out-dir']."""
    clients = len(str(settings["client-sizes"]).split(","))
    with local_deployment(work_dir, clients) as deployment:
        app = app_folder(deployment.work_dir / "app", settings)
        with open(deployment.work_dir / "flwr-run.log", "w") as log:
            try:
                done = subprocess.run(["flwr", "run", str(app), "gradinv", "--stream"], stdout=log, stderr=subprocess.STDOUT,
                                      env=deployment.environment, cwd=deployment.work_dir, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise UserError(f"the federation did not finish within {timeout:.0f} s; see "
                                f"{deployment.work_dir / 'flwr-run.log'}.") from None
        if done.returncode != 0:
            raise UserError(f"flwr run failed (exit code {done.returncode}); see {deployment.work_dir / 'flwr-run.log'}.")
    if not (Path(settings["out-dir"]) / "replies.json").is_file():
        raise UserError(f"the federation ran but its recorder wrote nothing to {settings['out-dir']}; see "
                        f"{Path(work_dir) / 'superlink.log'}.")
