"""Safe zip extraction for dataset uploads (unit level; tests/test_api_http.py covers the HTTP side)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from api.datasets import UploadError, ZipLimits, safe_extract

LIMITS = ZipLimits(max_total_bytes=64 << 20, max_ratio=100.0, max_entries=50)


def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize(
    "name", ["../evil.txt", "a/../../evil.txt", "/abs/evil.txt", "..\\evil.txt", "a\\..\\..\\evil.txt", "C:/evil"]
)
def test_entries_escaping_the_folder_are_refused(tmp_path: Path, name: str) -> None:
    z = _zip(tmp_path / "z.zip", {"ok.txt": b"fine", name: b"evil"})
    with pytest.raises(UploadError) as e:
        safe_extract(z, tmp_path / "out", LIMITS)
    assert e.value.status == 400 and e.value.code == "unsafe_archive"
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out").exists()


def test_ratio_bomb_refused_while_extracting(tmp_path: Path) -> None:
    # 20 MB of zeros: under the total limit, but it expands ~1000x its archive size.
    z = _zip(tmp_path / "z.zip", {"zeros.bin": b"\0" * (20 << 20)})
    with pytest.raises(UploadError) as e:
        safe_extract(z, tmp_path / "out", LIMITS)
    assert e.value.status == 413 and "zip bomb" in e.value.message


def test_too_many_entries_refused(tmp_path: Path) -> None:
    z = _zip(tmp_path / "z.zip", {f"f{i}.txt": b"x" for i in range(60)})
    with pytest.raises(UploadError) as e:
        safe_extract(z, tmp_path / "out", LIMITS)
    assert e.value.status == 413 and "60 entries" in e.value.message


def test_normal_archive_extracts_and_skips_macos_junk(tmp_path: Path) -> None:
    z = _zip(tmp_path / "z.zip", {"d/a.txt": b"a", "d/sub/b.txt": b"b", "__MACOSX/d/._a.txt": b"junk",
                                  "d/._c.txt": b"junk", "d/empty/": b""})  # fmt: skip
    files = safe_extract(z, tmp_path / "out", LIMITS)
    assert sorted(str(f) for f in files) == ["d/a.txt", "d/sub/b.txt"]
    assert (tmp_path / "out/d/sub/b.txt").read_bytes() == b"b"
    assert not (tmp_path / "out/__MACOSX").exists()
