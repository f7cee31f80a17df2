"""launch/recovery_demo.sh in its short form (two torchrun "nodes" x 2 gloo ranks, a tiny MLP):
node0 is SIGKILLed and its local_dir wiped, and the restart must restore the newest local step
from the partner copies and continue the reference run's loss curve bit for bit. The script
itself exits non-zero when either fails; this test also checks what it printed."""

from __future__ import annotations

import os

from distributed import run_command

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir)


def test_recovery_demo_restores_the_newest_local_step_and_continues_bitwise(tmp_path):
    env = dict(os.environ, STEPS="8", LOCAL_EVERY="2", DURABLE_EVERY="5", DIE_AT="7", HIDDEN="64")
    done = run_command(["bash", "launch/recovery_demo.sh", str(tmp_path / "demo")], cwd=REPO, env=env, timeout_s=240)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    # step 6 is the newest local step before the kill after step 7; the durable tier has step 5
    assert "restored step 6 from the local tier" in done.stdout, done.stdout
    assert "every loss bitwise equal to the reference run's: True" in done.stdout, done.stdout
