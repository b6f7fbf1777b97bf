"""The atomic-write helper: readers never see a torn file, and concurrent writers of one file do not collide."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from shared.files import write_bytes_atomic, write_text_atomic


def test_concurrent_writers_of_one_file_all_succeed(tmp_path: Path) -> None:
    # Two `chorus train` runs preparing the same artifacts write split.json at once: with one fixed temporary
    # name, one writer's rename removed the other's temporary and it failed with FileNotFoundError.
    target = tmp_path / "split.json"
    errors: list[BaseException] = []

    def write(payload: bytes) -> None:
        try:
            for _ in range(200):
                write_bytes_atomic(target, payload)
        except BaseException as error:  # noqa: BLE001 - collected and reported by the test
            errors.append(error)

    threads = [threading.Thread(target=write, args=(bytes([65 + i]) * 4096,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    content = target.read_bytes()
    assert len(content) == 4096 and len(set(content)) == 1  # one writer's bytes, whole
    assert [p.name for p in tmp_path.iterdir()] == ["split.json"]  # no temporary left behind


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = write_text_atomic(tmp_path / "a" / "config.json", "old")
    with pytest.raises(TypeError):
        write_bytes_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["config.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
