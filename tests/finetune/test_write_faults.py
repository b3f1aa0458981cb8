"""A full disk, a quota or a read-only mount mid-run: one line naming the path, the cause and
the fix, a non-zero exit, nothing half-written, and ``--resume`` afterwards ends as the
uninterrupted run. Faults are injected where the run writes (``faults.write_fault``), so no
root is needed; one case runs on a real small tmpfs where the machine allows it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import QUICK, ROOT, assert_same_run, crop_dataset, invoke, one_error_line, tiny_recipe

from enorm_cli import faults

FINETUNE = ["-m", "enorm_cli", "finetune", "--recipe", str(QUICK), "--no-progress"]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
CASES = {
    "first-state": ("state:1:ENOSPC", "no space left on the device"),
    "later-state": ("state:2:ENOSPC", "no space left on the device"),
    "checkpoint": ("checkpoint:1:EDQUOT", "the disk quota is used up"),
    "metrics": ("metrics:3:ENOSPC", "no space left on the device"),
    "read-only": ("metrics:4:EROFS", "the file system is read-only"),
}


def _args(crops: Path, out: Path) -> list[str]:
    """1 epoch of 6 steps, a state every 2, a record every step, one eval at the end."""
    return tiny_recipe(
        crops,
        out,
        "imagefolder",
        "schedule.epochs=1",
        "data.batch_size=4",
        "train.save_every_steps=2",
        "train.log_every=1",
    )


@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> Path:
    return crop_dataset(photo_dir, tmp_path_factory.mktemp("faults") / "crops", per_class=8)


@pytest.fixture(scope="module")
def reference(crops: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults_ref") / "run"
    result = invoke("finetune", "--recipe", str(QUICK), "--no-progress", *_args(crops, out))
    assert result.exit_code == 0, result.output
    return out


def assert_nothing_half_written(out: Path) -> None:
    """No partial state, no temp file, and every metrics record whole."""
    leftovers = [p for p in out.rglob("*") if ".partial" in p.name or ".tmp" in p.name]
    assert not leftovers, leftovers
    for state in (out / "state").glob("step_*"):
        assert (state / "progress.json").is_file(), state
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n") or not text
    for line in text.splitlines():
        __import__("json").loads(line)


def _again(out: Path) -> str:
    """How the user goes on: --resume from the newest state, or --force where the fault came
    before the first state (nothing to resume; the run's own folder starts over)."""
    return "--resume" if list((out / "state").glob("step_*")) else "--force"


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_refused_write_is_one_line_and_resumes_exactly(
    case: str, crops: Path, reference: Path, tmp_path: Path, monkeypatch
) -> None:
    spec, cause = CASES[case]
    out = tmp_path / "run"
    monkeypatch.setenv(faults.WRITE_ENV, spec)
    monkeypatch.setattr(faults, "_writes", {})
    failed = invoke("finetune", "--recipe", str(QUICK), "--no-progress", *_args(crops, out))
    one_error_line(failed, cause)
    line = failed.stderr.strip()
    assert str(out) in line and "--resume" in line and ("free space" in line or "writable" in line)
    assert_nothing_half_written(out)
    monkeypatch.delenv(faults.WRITE_ENV)
    args = ["finetune", "--recipe", str(QUICK), "--no-progress", *_args(crops, out)]
    done = invoke(*args, _again(out))
    assert done.exit_code == 0, done.output
    assert_same_run(out, reference)


def _torchrun(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *TORCHRUN, *FINETUNE, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def reference2(crops: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run on 2 gloo processes."""
    out = tmp_path_factory.mktemp("faults_ref2") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(faults.WRITE_ENV, None)
    done = _torchrun(_args(crops, out), env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["state:1:ENOSPC:1", "state:2:ENOSPC"], ids=["rank-1", "both"])
def test_two_processes_stop_together_on_a_refused_state_save(
    spec: str, crops: Path, reference2: Path, tmp_path: Path
) -> None:
    """One rank's (or both ranks') refused save stops both: no hang, no success, one line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", faults.WRITE_ENV: spec}
    out = tmp_path / "run"
    failed = _torchrun(_args(crops, out), env)
    assert failed.returncode != 0
    lines = [ln for ln in failed.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "no space left on the device" in lines[0], failed.stderr[-3000:]
    # torchrun reports a failed worker with its own traceback; none comes from enorm
    assert f'File "{ROOT / "enorm_cli"}' not in failed.stderr, failed.stderr[-3000:]
    assert "exitcode  : 0" not in failed.stderr  # torchrun's report: no rank ended well
    assert_nothing_half_written(out)
    del env[faults.WRITE_ENV]
    done = _torchrun([*_args(crops, out), _again(out)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(out, reference2)


def _tmpfs(path: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` at ``path`` (root on Linux only)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    return done.returncode == 0


@pytest.mark.slow
def test_a_real_full_disk(crops: Path, reference: Path, tmp_path: Path) -> None:
    """A real 3 MB tmpfs: the run fills it at a state save and stops with the line; on a
    larger one, --resume ends as the uninterrupted run."""
    fs = tmp_path / "fs"
    if not _tmpfs(fs, "3m"):
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    try:
        out = fs / "run"
        failed = invoke("finetune", "--recipe", str(QUICK), "--no-progress", *_args(crops, out))
        one_error_line(failed, "no space left on the device")
        assert_nothing_half_written(out)
        moved = tmp_path / "run"
        shutil.copytree(out, moved)  # "free space": the same run on a roomier disk
    finally:
        subprocess.run(["umount", str(fs)])
    args = ["finetune", "--recipe", str(QUICK), "--no-progress", *_args(crops, moved)]
    done = invoke(*args, _again(moved))
    assert done.exit_code == 0, done.output
    assert_same_run(moved, reference)


@pytest.mark.slow
def test_convert_onto_a_full_disk_is_one_line(tmp_path: Path) -> None:
    """``enorm convert`` onto a real 1 MB tmpfs: one line, no temp file left behind."""
    fs = tmp_path / "fs"
    if not _tmpfs(fs, "1m"):
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    try:
        out = fs / "r.safetensors"
        result = invoke(
            "convert", "test_resnet", "--no-pretrained", "--no-verify", "--out", str(out)
        )
        one_error_line(result, "no space left on the device")
        assert "free space under" in result.stderr and not list(fs.iterdir())
    finally:
        subprocess.run(["umount", str(fs)])
