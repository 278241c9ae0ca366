"""One way to read and write local paths and s3:// URIs.

Everything goes through pyarrow's filesystems, the same layer Ray Train and Ray Data use, so a URI that works
for one works for all. S3 honours the usual AWS environment (credentials, region, and AWS_ENDPOINT_URL for
S3-compatible servers such as MinIO or moto).
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


class StorageError(OSError):
    pass


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI."""
    uri = str(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    if uri.startswith("s3://"):
        # from_uri would ignore AWS_ENDPOINT_URL in some pyarrow builds; pass it explicitly.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        # allow_delayed_open lets Arrow send small files as one PutObject instead of a multipart upload:
        # fewer round trips, and S3-compatible servers (MinIO, moto) handle it more reliably.
        return pafs.S3FileSystem(allow_delayed_open=True, **kwargs), uri[len("s3://"):].rstrip("/")
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for unknown schemes
        raise StorageError(f"unsupported storage URI {uri!r}: {exc}") from None


def join(uri: str, *parts: str) -> str:
    out = str(uri).rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Readers see the old content or the new, never a partial file (rename locally; S3 PUTs are atomic)."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=".tmp-")
        # mkstemp makes the file private (0600); the finished file gets the mode any new file would, so an output
        # folder shared by a team stays readable to it.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def list_files(uri: str, recursive: bool = True) -> list[str]:
    """Files at `uri`: the file itself, everything under a folder, or the matches of a glob; sorted URIs."""
    uri = str(uri)
    fs, path = filesystem(uri)
    prefix = "s3://" if uri.startswith("s3://") else ""
    if any(ch in path for ch in "*?["):
        # Glob: list from the longest wildcard-free folder, then match the whole pattern.
        base = path
        while any(ch in base for ch in "*?["):
            base = base.rsplit("/", 1)[0]
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        found = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            found = [info.path]
        elif info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
            found = [i.path for i in infos if i.type == pafs.FileType.File]
        else:
            found = []
    # Hidden and marker files (_SUCCESS, .tmp-*) are never data.
    found = [p for p in found if not os.path.basename(p).startswith((".", "_"))]
    return sorted(prefix + p for p in found)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder to `uri` (local or remote), replacing files of the same name."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        shutil.copytree(local_dir, path, dirs_exist_ok=True)
        return
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(uri: str, local_dir: str | Path) -> Path:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise StorageError(f"{uri}: no such directory")
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return Path(local_dir)


def local_dir(uri: str) -> Path:
    """A local folder holding `uri`'s content: the folder itself if local, else a cached download."""
    if not is_remote(uri):
        return Path(uri.removeprefix("file://")).resolve()
    cache_root = model_cache()
    # Keyed by the URI and the remote folder's config.json/bertray.json times, so a model re-exported to the
    # same URI is downloaded again rather than served stale.
    fs, path = filesystem(uri)
    stamps = [str(i.mtime_ns) for i in fs.get_file_info([f"{path}/config.json", f"{path}/bertray.json"])
              if i.type == pafs.FileType.File]
    target = cache_root / hashlib.sha256("|".join([uri, *stamps]).encode()).hexdigest()[:16]
    done = target / ".complete"
    if not done.exists():
        tmp = Path(tempfile.mkdtemp(dir=cache_root))
        download_dir(uri, tmp)
        (tmp / ".complete").write_text(uri)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_cache() -> Path:
    """This user's folder of downloaded models (BERTRAY_CACHE, else one in the temp folder). A model loaded from a
    cache that another user could write to would run whatever they put there: it is private (private_dir)."""
    return private_dir(os.environ.get("BERTRAY_CACHE", Path(tempfile.gettempdir()) / f"bertray-cache-{os.getuid()}"),
                       "set BERTRAY_CACHE to a folder of your own")


def private_dir(path: str | Path, remedy: str) -> Path:
    """`path` as a folder that only this user can enter, made if missing; a StorageError ending with `remedy` if it
    is a link or another user's. A folder others can write to would let them plant what this process then runs."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():  # lstat: a link is not a folder
        raise StorageError(f"{path} is not a folder of this user's (another user's, or a link); remove it, or "
                           f"{remedy}")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return Path(path)
