"""`end_process_after_group`: a process that started a process group ends through os._exit with its code, its
logs and stdio flushed; any other process (a test calling the command in-process) is left to go on."""

from __future__ import annotations

import subprocess
import sys

from faceforge.train import distributed as fdist


def test_without_a_group_the_code_is_returned() -> None:
    assert fdist._STARTED_GROUP is False  # no test in this process starts a group of more than one rank
    assert fdist.end_process_after_group(3) == 3


def test_after_a_group_the_process_ends_with_the_code_and_flushed_output(tmp_path) -> None:
    code = (
        "import logging, sys\n"
        "from faceforge.train import distributed as fdist\n"
        f"logging.basicConfig(filename={str(tmp_path / 'log.txt')!r}, level=logging.INFO)\n"
        "logging.getLogger('faceforge').info('logged before the end')\n"
        "print('printed before the end', end='')\n"
        "fdist._STARTED_GROUP = True  # as init_distributed sets it after starting a group\n"
        "fdist.end_process_after_group(5)\n"
        "print('never printed')\n"
        "sys.exit(0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 5
    assert proc.stdout == "printed before the end"
    assert "logged before the end" in (tmp_path / "log.txt").read_text()
