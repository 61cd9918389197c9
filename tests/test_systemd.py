"""The systemd unit for `embedq up` (compose/systemd): it starts the stack at boot and again when
it fails, lets `embedq up` stop its children in order within the stop timeout, and its env file sets
only settings the code reads. `systemd-analyze verify` checks the unit where systemd is installed."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.launch import stack

from .conftest import ROOT
from .deployment import cli_options, setting_variables

SYSTEMD = ROOT / "compose" / "systemd"
UNIT = SYSTEMD / "embedq.service"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd's keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_runs_embedq_up_at_boot_and_again_on_failure():
    service = unit()["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[1:] == ["up"] and "up" in cli_options()
    assert Path(argv[0]) == Path(service["WorkingDirectory"]) / ".venv" / "bin" / "embedq"
    assert service["Restart"] == "on-failure" and unit()["Unit"]["StartLimitIntervalSec"] == "0"
    assert unit()["Install"]["WantedBy"] == "multi-user.target"
    assert service["EnvironmentFile"] == "/etc/embedq/embedq.env"
    state = f"/var/lib/{service['StateDirectory']}"
    assert f"EMBEDQ_VAR_DIR={state}" in shlex.split(service["Environment"]), "state outside StateDirectory"


def test_embedq_up_alone_gets_sigterm_and_time_to_stop_in_order():
    service = unit()["Service"]
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    # The API, the workers' warm then cold stop, Flower, Milvus Lite (20 s), Redis; each may take 5 s more.
    budget = stack.API_STOP_S + stack.WORKER_STOP_S + stack.WORKER_COLD_STOP_S + 10 + 20 + 10 + 5 * 5
    assert float(service["TimeoutStopSec"]) > budget


def test_the_env_file_sets_only_settings():
    known = setting_variables()
    for line in (SYSTEMD / "embedq.env").read_text().splitlines():
        line = line.lstrip("# ")
        if "=" in line and line.split("=", 1)[0].isupper():
            name = line.split("=", 1)[0]
            assert name.startswith("EMBEDQ_") and name in known, name


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit(tmp_path):
    # The unit's paths, pointed at this checkout, so that only the unit itself is judged.
    text = UNIT.read_text().replace("/opt/embedq/.venv/bin/embedq", str(Path(sys.executable).with_name("embedq")))
    (tmp_path / UNIT.name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / UNIT.name)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
