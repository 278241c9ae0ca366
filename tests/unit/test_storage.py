"""bertray.storage on local paths: atomic writes with the modes a team expects, and a private model cache."""
from __future__ import annotations

import os
import stat

import pytest

from bertray import storage


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    storage._umask.cache_clear()
    try:
        storage.write_text(str(tmp_path / "out" / "metrics.json"), "{}")
    finally:
        os.umask(old)
        storage._umask.cache_clear()
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "metrics.json").st_mode) == mode
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["metrics.json"]  # no temp file left behind


def test_the_model_cache_is_private(tmp_path):
    open_dir = tmp_path / "cache"
    open_dir.mkdir(mode=0o777)
    os.chmod(open_dir, 0o777)
    assert storage.private_dir(open_dir, "unused") == open_dir
    assert stat.S_IMODE(os.stat(open_dir).st_mode) == 0o700
    made = storage.private_dir(tmp_path / "new" / "cache", "unused")
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700


def test_a_cache_that_is_a_link_or_anothers_is_refused(tmp_path, monkeypatch, s3_bucket):
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    monkeypatch.setenv("BERTRAY_CACHE", str(tmp_path / "link"))
    with pytest.raises(storage.StorageError, match="not a folder of this user's"):
        storage.local_dir(f"{s3_bucket}/model")
    if os.getuid() != 0:
        pytest.skip("only root can give a folder to another user")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    monkeypatch.setenv("BERTRAY_CACHE", str(theirs))
    with pytest.raises(storage.StorageError, match="BERTRAY_CACHE"):
        storage.local_dir(f"{s3_bucket}/model")


def test_the_default_cache_is_per_user(tmp_path, monkeypatch, s3_bucket):
    """A model read from s3:// lands in a cache folder named for this user, private to it."""
    monkeypatch.delenv("BERTRAY_CACHE", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    storage.write_text(f"{s3_bucket}/model/config.json", "{}")
    local = storage.local_dir(f"{s3_bucket}/model")
    assert local.parent == tmp_path / f"bertray-cache-{os.getuid()}"
    assert stat.S_IMODE(os.stat(local.parent).st_mode) == 0o700
    assert (local / "config.json").read_text() == "{}"
