"""Exact resume: a run killed anywhere and resumed writes the uninterrupted run's metrics and
weights; preemption signals stop it cleanly with a resumable state. Real processes (one,
and two over gloo), real SIGKILL (``faults.crash_point``) and SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import QUICK, ROOT, assert_same_run, crop_dataset, tiny_recipe

from enorm_cli.faults import ENV as CRASH_ENV

FINETUNE = ["-m", "enorm_cli", "finetune", "--recipe", str(QUICK), "--no-progress"]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **extra}
    env.pop(CRASH_ENV, None)
    return {**env, **extra}


def _args(crops: Path, out: Path) -> list[str]:
    """2 epochs of 12 steps; a state every 5 steps; records every 2 (so a resumed window
    must carry the losses since the last record)."""
    return tiny_recipe(
        crops,
        out,
        "imagefolder",
        "data.batch_size=2",
        "train.save_every_steps=5",
        "train.log_every=2",
        "train.keep_states=3",
    )


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def crops_module(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> Path:
    """The ``crops`` image folder, once for the module's runs."""
    return crop_dataset(photo_dir, tmp_path_factory.mktemp("resume_data") / "crops", per_class=8)


LAUNCHERS = {1: [], 2: TORCHRUN}
"""Processes -> what runs ``python -m enorm_cli`` (2: torchrun, gloo on CPU)."""


class _References(dict):
    """Process count -> the uninterrupted run, made the first time a test asks for it."""

    def __init__(self, crops: Path, factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self.crops, self.factory = crops, factory

    def __missing__(self, processes: int) -> Path:
        out = self.factory.mktemp(f"resume{processes}") / "uninterrupted"
        cmd = [sys.executable, *LAUNCHERS[processes], *FINETUNE, *_args(self.crops, out)]
        done = _run(cmd, _env())
        assert done.returncode == 0, done.stderr[-3000:]
        self[processes] = out
        return out


@pytest.fixture(scope="module")
def references(crops_module: Path, tmp_path_factory: pytest.TempPathFactory) -> _References:
    return _References(crops_module, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize(
    "crash", ["step:8", "eval:2", "save:3"], ids=["mid-epoch", "mid-eval", "mid-save"]
)
def test_resume_after_sigkill_reproduces_the_run(
    crash: str, processes: int, crops_module: Path, references: dict[int, Path], tmp_path: Path
) -> None:
    """Killed at the point, resumed: the uninterrupted run's records and weights. With 2 gloo
    processes: per-process RNG, sampler shards and synced EN statistics restored too."""
    out = tmp_path / "run"
    cmd = [sys.executable, *LAUNCHERS[processes], *FINETUNE, *_args(crops_module, out)]
    killed = _run(cmd, _env(**{CRASH_ENV: crash}))
    assert killed.returncode != 0 and list((out / "state").glob("step_*/progress.json"))
    if processes == 1:
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    if crash.startswith("save"):  # the state being written stays partial, never a resume point
        assert list((out / "state").glob(".step_*.partial"))
        assert all((p / "progress.json").exists() for p in (out / "state").glob("step_*"))
    done = _run([*cmd, "--resume"], _env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout
    assert_same_run(out, references[processes])


@pytest.mark.slow
def test_sigterm_saves_exits_75_and_resumes_to_the_same_result(
    crops_module: Path, references: dict[int, Path], tmp_path: Path
) -> None:
    out = tmp_path / "preempted"
    cmd = [sys.executable, *FINETUNE, *_args(crops_module, out)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= 2
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert (
        "stopped by SIGTERM" in lines[-1] and "--resume" in lines[-1] and "Traceback" not in stderr
    )
    done = _run([*cmd, "--resume"], _env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(out, references[1])


def test_a_second_signal_exits_at_once() -> None:
    code = (
        "import os, signal, time\n"
        "from enorm_cli.finetune.preemption import PreemptionGuard\n"
        "with PreemptionGuard() as guard:\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    assert guard.signal_name == 'SIGUSR1'\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
