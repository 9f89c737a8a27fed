"""`files.atomic_write`: the one way the package writes an artifact (a temporary name, then a rename)."""

import errno
import os
import subprocess
import sys

import pytest

from aletheia_utils import files


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_file_appears_only_when_complete(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with files.atomic_write(target) as tmp:
        tmp.write_text("{}")
        assert tmp.parent == target.parent and tmp.name.startswith(".out.json.tmp-") and not target.exists()
    assert target.read_text() == "{}" and _names(target.parent) == ["out.json"]
    files.write_text(target, "new")
    assert target.read_text() == "new" and _names(target.parent) == ["out.json"]


def test_a_folder_replaces_the_old_one(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_text("old")
    with files.atomic_write(target) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
    assert _names(target) == ["config.json"] and _names(tmp_path) == ["model"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_error_leaves_nothing_and_keeps_the_old_version(tmp_path, error):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(type(error)), files.atomic_write(target) as tmp:
        tmp.write_text("half")
        raise error
    assert target.read_text() == "old" and _names(tmp_path) == ["out.txt"]


def test_a_full_disk_names_the_target(tmp_path):
    target = tmp_path / "model-Q8_0.gguf"
    with pytest.raises(OSError) as caught, files.atomic_write(target) as tmp:
        tmp.write_bytes(b"GGUF")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write() raises on a full disk
    assert caught.value.errno == errno.ENOSPC and str(target) in str(caught.value), caught.value
    assert "No space left on device" in str(caught.value) and _names(tmp_path) == []


def test_nothing_written_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"), files.atomic_write(tmp_path / "x"):
        pass


def test_an_existing_target_wins_without_replace(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "theirs").write_text("1")
    with files.atomic_write(target, replace=False) as tmp:
        tmp.mkdir()
        (tmp / "ours").write_text("2")
    assert _names(target) == ["theirs"] and _names(tmp_path) == ["cache"]


def test_temporaries_of_killed_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    target = tmp_path / "out.json"
    (tmp_path / f".out.json.tmp-{dead}").write_text("half")  # a writer SIGKILLed mid-write
    (tmp_path / f".out.json.tmp-{os.getppid()}").write_text("busy")  # a live writer's
    files.write_text(target, "{}")
    assert _names(tmp_path) == [f".out.json.tmp-{os.getppid()}", "out.json"]
