"""A run folder, and `RunDir`, the one owner of its layout: the artifacts, run.json (the run's
identity and the fingerprint of its base model), the lock, metrics, checkpoints and evaluation
caches; and loading a trained run, as arrays (export) or as a model (evaluate, generate).

    <run>/experts.safetensors   phase 1's experts       <run>/router.safetensors  phase 2's router
    <run>/run.json              identity, configs       <run>/safemoe.json        the summary
    <run>/metrics.jsonl         per-step metrics        <run>/data_order.jsonl    data audit trail
    <run>/data_card.{json,txt}  the data card           <run>/loss_curves.png
    <run>/checkpoints/phaseN/   Orbax checkpoints       <run>/eval/               evaluation
    <run>/.lock                 the trainer's flock     <run>/sft_lora.safetensors  SFT baseline
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from safetensors import numpy as st

from safemoe_jax.core import config as C
from safemoe_jax.core import sharding as S
from safemoe_jax.core.config import ConfigError, ExpertsConfig, ModelConfig, RouterConfig
from safemoe_jax.core.experts import ExpertParam, RouterParam, target_dims
from safemoe_jax.core.model import SafeMoELM
from safemoe_jax.errors import SafeMoEError
from safemoe_jax.io import assets
from safemoe_jax.io import base as B
from safemoe_jax.io import hub, jsonio, paths
from safemoe_jax.io import weights as W
from safemoe_jax.log import get_logger
from safemoe_jax.train.checkpoint import host, load_group, nonfinite_names
from safemoe_jax.train.config import TrainConfig

log = get_logger(__name__)


class RunError(SafeMoEError, ValueError):
  """A run folder cannot be used as asked (not a run, unfinished, another base model)."""


def fingerprint(path: Path) -> str:
  """sha256 of a weights file; of a folder: its files' names and sizes, its JSON files, and 16
  evenly spaced 64 KiB samples of every other file (a retrained model of the same shape has the
  same sizes and config, but not the same bytes)."""
  path = Path(path)
  if path.is_file():
    return assets.sha256_file(path)
  h = hashlib.sha256()
  for f in sorted(path.iterdir()):
    if f.is_file():
      size = f.stat().st_size
      h.update(f.name.encode())
      h.update(str(size).encode())
      if f.name.endswith(".json") or size <= 1 << 20:
        h.update(f.read_bytes())
        continue
      with open(f, "rb") as fh:
        for k in range(16):
          fh.seek(k * (size - (1 << 16)) // 15)
          h.update(fh.read(1 << 16))
  return h.hexdigest()


# Settings that may differ between the start of a run and its resume: where and how it runs and
# logs, not what it computes. model.remat recomputes the same values; the mesh only places
# them; on_nonfinite decides what happens to a bad batch, not to a good one; model.path may move
# (the base model is checked by the fingerprint of its weights instead). Everything else
# in TrainConfig (optimiser, steps, batch, data, seeds, experts, router, dtypes) shapes the
# trained state and is the run's identity.
RESUMABLE = ("output_dir", "log.", "profile.", "quick_look", "keep_checkpoints",
             "async_checkpoints", "resume.", "mesh.",
             "model.remat", "model.path", "phase1.ckpt_every", "phase2.ckpt_every",
             "phase1.eval_every", "phase2.eval_every", "phase1.on_nonfinite",
             "phase2.on_nonfinite")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out: dict[str, Any] = {}
    for k, v in d.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def identity(cfg: TrainConfig) -> dict[str, Any]:
  """The dotted config fields that shape the trained state, plus the bytes of local data files."""
  flat = _flat(json.loads(json.dumps(C.to_dict(cfg), default=str)))
  ident = {k: v for k, v in flat.items() if not k.startswith(RESUMABLE)}
  for src in cfg.data.sources:
    if src.kind == "local" and src.path and Path(src.path).is_file():
      ident[f"data.file.{src.name}.sha256"] = fingerprint(Path(src.path))
  return ident




class RunLock:
  """One trainer per output_dir: an exclusive `flock` on <output_dir>/.lock, held for the
  process's lifetime and released by the kernel when it ends, even by kill -9. The file names
  the holder (pid, host, start time) for the error message. On a network file system without
  working flock (some NFS setups) it locks nothing; the lock is per machine there."""

  def __init__(self, out: Path, who: str = "trainer"):
    self.path = out / ".lock"
    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = self.path.read_text().strip() or "another process"
      os.close(self.fd)
      raise ConfigError(f"output_dir {out} is in use by another trainer ({holder}); two "
                        f"trainers on one folder would overwrite each other's checkpoints and "
                        f"logs. Wait for it to finish (or stop it), or use another "
                        f"output_dir") from None
    os.ftruncate(self.fd, 0)
    os.pwrite(self.fd, f"{'' if who == 'trainer' else who + ' '}pid {os.getpid()} on "
                       f"{socket.gethostname()}, since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)

  def release(self) -> None:
    if self.fd is not None:
      os.close(self.fd)  # closing the last descriptor releases the flock
      self.fd = None


@dataclasses.dataclass
class TrainedRun:
  """A trained run's artifacts as arrays, and the configurations they were made with."""
  dir: Path
  model: ModelConfig
  experts_cfg: ExpertsConfig
  domains: tuple[str, ...]  # expert e <-> domains[e]
  experts: dict[str, np.ndarray]  # 'A_q': [L, E, I, R], 'B_q': [L, E, R, O], ...
  router_cfg: RouterConfig | None
  router: dict[str, np.ndarray] | None  # flat keys as checkpoint.save_group writes: 'router.w_out'
  base_path: str  # the base model the experts were trained on (HF folder or .gguf)
  base_fingerprint: str | None
  info: dict[str, Any]  # run.json, or an import's artifact metadata

  @property
  def scale(self) -> float:
    return self.experts_cfg.alpha / self.experts_cfg.rank


@dataclasses.dataclass
class LoadedRun:
  """A finished run as a model: its TrainConfig, base model, SafeMoE model (experts and router
  loaded) and the base model's fingerprint."""
  cfg: TrainConfig
  base: B.Base  # lazy: its weights live in `model`, sharded (base.params is {})
  model: SafeMoELM
  fingerprint: str

  def host_params(self) -> dict[str, np.ndarray]:
    """The base weights gathered to this host, in SafeMoELM.load_base's layout: for what builds
    its own model over them (the SFT and harmful-LoRA baselines)."""
    keys = set(W.expected_shapes(self.base.config))
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(self.model))}
    return {k: host(v.get_value()) for k, v in flat.items() if k in keys}


def _metadata(path: Path) -> dict[str, Any]:
  with st.safe_open(str(path), "np") as f:
    md = f.metadata() or {}
  try:
    return json.loads(md.get("safemoe", "{}"))
  except json.JSONDecodeError:
    return {}


class RunDir:
  """A training output folder. Every path inside a run is named here, nowhere else."""

  EXPERTS = "experts.safetensors"
  ROUTER = "router.safetensors"
  RUN_JSON = "run.json"
  SUMMARY = "safemoe.json"
  ARTIFACTS = {"phase1": EXPERTS, "phase2": ROUTER}  # the trained group of each phase

  def __init__(self, path: str | Path):
    self.path = paths.as_path(path)  # local: pathlib.Path; gs://...: epath.Path

  def __truediv__(self, name: str) -> Path:
    return self.path / name

  def __repr__(self) -> str:
    return f"RunDir({str(self.path)!r})"

  # --- layout --------------------------------------------------------------------------------
  @property
  def experts(self) -> Path:
    return self.path / self.EXPERTS

  @property
  def router(self) -> Path:
    return self.path / self.ROUTER

  @property
  def run_json(self) -> Path:
    return self.path / self.RUN_JSON

  @property
  def summary(self) -> Path:
    return self.path / self.SUMMARY

  @property
  def metrics(self) -> Path:
    return self.path / "metrics.jsonl"

  @property
  def data_order(self) -> Path:
    return self.path / "data_order.jsonl"

  @property
  def loss_curves(self) -> Path:
    return self.path / "loss_curves.png"

  @property
  def lock_file(self) -> Path:
    return self.path / ".lock"

  @property
  def eval_dir(self) -> Path:
    return self.path / "eval"

  def data_card(self, suffix: str) -> Path:
    return self.path / f"data_card.{suffix}"

  def artifact(self, phase: str) -> Path:
    return self.path / self.ARTIFACTS[phase]

  def checkpoints(self, phase: str) -> Path:
    return self.path / "checkpoints" / phase

  def single_lora(self, kind: str) -> Path:
    """The artifact of a single-LoRA baseline of the evaluation (sft, harmful_lora)."""
    return self.path / ("sft_lora.safetensors" if kind == "sft" else f"{kind}.safetensors")

  # --- writing -------------------------------------------------------------------------------
  def check_writable(self) -> None:
    out = self.path
    try:
      out.mkdir(parents=True, exist_ok=True)
      probe = out / f".write_probe_{os.getpid()}"
      probe.write_bytes(b"0" * 4096)
      probe.unlink()
    except OSError as e:
      raise ConfigError(f"output_dir {out} is not writable ({e.strerror}); choose another "
                        f"output_dir or fix its permissions / free disk space") from None

  def lock(self, who: str = "trainer") -> RunLock | None:
    """The run's flock (held by a trainer, or by `evaluate` while it trains and writes its
    baselines); None on remote storage (gs://), which has no locks: there, one writer per
    output_dir is up to the user (a second one would overwrite the first's files)."""
    if not paths.is_local(self.path):
      log.warning(f"{self.path} is not a local folder: no lock guards it against a second "
                  f"writer (object stores have no locks); run one command per output_dir")
      return None
    return RunLock(self.path, who)

  def check_not_input(self, model_path: str) -> None:
    """The run folder must not be the base model's folder (the run's own files would change
    the folder's fingerprint: it could never be loaded or resumed), nor a model folder that is
    not a run."""
    out = self.path
    if not paths.is_local(out) or not out.exists():
      return
    m = Path(model_path) if model_path else None
    if m is not None and m.exists() and out.resolve() == (m if m.is_dir() else m.parent).resolve():
      raise ConfigError(f"output_dir {out} is the base model's folder (model.path {model_path}):"
                        f" the run's files would change the base model's fingerprint, and the "
                        f"run could never be loaded or resumed. Choose another output_dir")
    if out.is_dir() and not self.run_json.exists() and (
        any(out.glob("*.gguf")) or ((out / "config.json").is_file()
                                    and any(out.glob("model*.safetensors")))):
      raise ConfigError(f"output_dir {out} holds a model, not a run: training there would mix "
                        f"the run's files into it. Choose another output_dir")

  def write_json(self, path: Path, doc: Any, default: Callable = str) -> None:
    """Writes a JSON file of the run atomically (a kill leaves only its .tmp; an object store's
    write is atomic by itself)."""
    if not paths.is_local(path):
      path.write_text(json.dumps(doc, indent=1, default=default))
      return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per writer: no shared .tmp
    tmp.write_text(json.dumps(doc, indent=1, default=default))
    os.replace(tmp, path)

  # --- run.json: the identity of a run ------------------------------------------------------
  def info(self) -> dict | None:
    """run.json (None when there is none); a cut or damaged one is an error naming it."""
    if not self.run_json.exists():
      return None
    try:
      return jsonio.read_json(self.run_json)
    except jsonio.FileFormatError as e:
      raise RunError(f"{e}. run.json records the run's identity: restore it from a backup, or "
                     f"train into a new output_dir") from None

  def started(self) -> dict[str, bool]:
    """Which phases have trained state here (a checkpoint or the phase's artifact)."""
    started = {}
    for ph in self.ARTIFACTS:
      d = self.checkpoints(ph)
      started[ph] = self.artifact(ph).exists() or (
          d.is_dir() and any(x.name.isdigit() for x in d.iterdir()))
    return started

  def changed(self, cfg: TrainConfig, old: dict) -> dict[str, tuple[Any, Any]]:
    """Identity fields that differ from the run here, where the state they shape exists: the
    settings of a phase that has not started may still change (e.g. phase2 after phase1 only)."""
    started = self.started()
    if not any(started.values()):
      return {}
    was = old.get("identity")
    if was is None:  # run.json from before identities were recorded: its config
      was = {k: v for k, v in _flat(old.get("config", {})).items() if not k.startswith(RESUMABLE)}
    now = identity(cfg)
    diff = {}
    # Fields on one side only (a setting added to or removed from the trainer since the run
    # started, a data file not fingerprinted then) are not compared.
    for k in sorted(set(was) & set(now)):
      if k.startswith(("phase1.", "phase2.")) and not started[k.split(".")[0]]:
        continue
      if not C.same_setting(was[k], now[k]):
        diff[k] = (was[k], now[k])
    return diff

  def record(self, cfg: TrainConfig, path: Path, mcfg: ModelConfig, write: bool = True) -> dict:
    """What a checkpoint here depends on; a restart must match it. With `write` (under the
    run's lock) a new run.json is written, or accepted changes are recorded in it."""
    out, f = self.path, self.run_json
    base = {"path": str(path.absolute()), "fingerprint": fingerprint(path)}
    if cfg.model.path and hub.is_hub_id(cfg.model.path):
      base.update(hub_id=cfg.model.path, revision=cfg.model.revision)
    info = {"base_model": base,
            "model": C.to_dict(mcfg), "domains": list(cfg.data.domains),
            "experts": C.to_dict(cfg.experts_config()), "router": C.to_dict(cfg.router),
            "seed": cfg.seed}
    old = self.info()
    if old is not None:
      for key in ("base_model", "domains", "experts", "router", "seed"):
        a, b = old.get(key), info[key]
        if key == "base_model":
          a, b = (a or {}).get("fingerprint"), b["fingerprint"]
        if a != b:
          raise ConfigError(f"{out} holds a run with a different {key} ({a} vs now {b}); its "
                            f"checkpoints do not fit this model. Use another output_dir, or "
                            f"delete {out} to start over")
      diff = self.changed(cfg, old)
      bad = {k: v for k, v in diff.items() if k not in cfg.resume.allow_changes}
      if bad:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(bad.items())[:8])
        raise ConfigError(
            f"{out} holds a run started with other settings that shape its trained state "
            f"({shown}); resuming would mix them. Use another output_dir (or the settings it was "
            f"started with), or accept the change explicitly with "
            f"resume.allow_changes=[{','.join(bad)}] (recorded in run.json)")
      if not write:
        return info
      if diff:
        log.warning(f"resuming with changed settings {sorted(diff)} "
                    f"(resume.allow_changes); recorded in {f}")
        old.setdefault("changes", []).append(
            {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "fields": {k: list(v) for k, v in diff.items()}})
      elif not any(self.started().values()):  # nothing trained yet: this run's settings are it
        old = None
      if old is not None:  # what differs is accepted, or shapes only a phase not started yet
        old["identity"], old["config"] = identity(cfg), C.to_dict(cfg)
        self.write_json(f, old)
        return info
    if write:
      self.write_json(f, {**info, "config": C.to_dict(cfg), "identity": identity(cfg)})
    return info

  # --- loading a trained run ----------------------------------------------------------------
  def load(self) -> TrainedRun:
    """The experts (and router, when trained) as arrays, with the configurations they were
    made with: run.json, or the metadata an import writes into experts.safetensors."""
    d, f = self.path, self.experts
    if not f.is_file():
      raise RunError(f"{d} has no experts.safetensors: train phase 1 first (python -m "
                     "safemoe_jax.train output_dir=...) or import adapters into it (python -m "
                     "safemoe_jax export import ...)")
    info = self.info() or _metadata(f).get("run") or {}
    if not info.get("model") or not info.get("experts"):
      raise RunError(f"{f} carries no run metadata and {d}/run.json is missing: the model and "
                     "expert configuration it was written with are unknown")
    mcfg = C.from_dict(ModelConfig, info["model"])
    ecfg = C.from_dict(ExpertsConfig, info["experts"])
    domains = tuple(info.get("domains") or ecfg.domains
                    or [f"expert{e}" for e in range(ecfg.num_experts)])
    experts = {k.removeprefix("experts."): v for k, v in st.load_file(str(f)).items()}
    L, E, R = mcfg.num_layers, ecfg.num_experts, ecfg.rank
    want = {}
    for t in ecfg.targets:
      d_in, d_out = target_dims(mcfg)[t][:2]
      want |= {f"A_{t}": (L, E, d_in, R), f"B_{t}": (L, E, R, d_out)}
    got = {k: tuple(v.shape) for k, v in experts.items()}
    if got != want:
      raise RunError(f"{f} does not match its configuration ({E} experts of rank {R} on "
                     f"{list(ecfg.targets)}): expected {want}, found {got}")
    if len(domains) != E:
      raise RunError(f"{f}: {len(domains)} domains {list(domains)} for {E} experts")
    _check_finite(f, experts)
    router = rcfg = None
    if self.router.is_file():
      router = dict(st.load_file(str(self.router)))
      _check_finite(self.router, router)
      rcfg = C.from_dict(RouterConfig, info["router"]) if info.get("router") else None
      if rcfg is not None:
        _check_router_shapes(self.router, router, mcfg, ecfg, rcfg)
    base = info.get("base_model") or {}
    return TrainedRun(d, mcfg, ecfg, domains, experts, rcfg, router, str(base.get("path", "")),
                      base.get("fingerprint"), info)

  def base_path(self, recorded: str, fp: str | None, given: str | Path | None = None) -> Path:
    """Where the run's base model is now: `given`, else the recorded path; the embedded default
    is fetched again when this machine lacks it."""
    path = Path(given or recorded)
    if not path.exists() and not given and fp in assets.EMBEDDED_SHA256:
      path = assets.EMBEDDED_SHA256[fp]()
    return path

  def check_base(self, path: Path, recorded_fp: str | None, fix: str) -> str:
    """The fingerprint of the base model at `path`; it must be the one the run was trained on."""
    now = fingerprint(path)
    if recorded_fp and recorded_fp != now:
      raise RunError(f"base model {path} differs from the one {self.path} was trained on "
                     f"(fingerprint {now[:12]} vs {recorded_fp[:12]}); {fix}")
    return now

  def load_model(self, mesh: S.MeshConfig | None = None) -> LoadedRun:
    """A finished run as a model: its TrainConfig, the base model it was trained on (checked by
    fingerprint), experts and router loaded. Built as training builds it: abstractly, then every
    array on its sharding over `mesh` (default: the run's mesh.*, or all devices data-parallel
    where that does not fit this machine), each device's base shard read from the checkpoint;
    no device ever holds the whole model unless the mesh replicates it."""
    info = self.info()
    if info is None:
      raise RunError(f"{self.path} has no run.json: not a training output directory (train "
                     f"with `python -m safemoe_jax.train output_dir={self.path}`)")
    cfg = dataclasses.replace(C.from_dict(TrainConfig, info["config"]),
                              output_dir=str(self.path))
    for f in (self.experts, self.router):
      if not f.exists():
        raise RunError(f"{f} is missing: the run has not finished (run the same train "
                       f"command again to resume it)")
    base = B.load_base(cfg.model.path, revision=cfg.model.revision,
                       param_dtype=cfg.model.param_dtype, compute_dtype=cfg.model.compute_dtype,
                       remat=cfg.model.remat, lazy=True)
    fp = self.check_base(base.path, info.get("base_model", {}).get("fingerprint"),
                         "set model.path to the original weights")
    mcfg = mesh or S.fitting_mesh(cfg.mesh)
    model = base.sharded_model(cfg.experts_config(), cfg.router, cfg.seed, S.make_mesh(mcfg),
                               mcfg.rules)
    for f, filt in ((self.experts, ExpertParam), (self.router, RouterParam)):
      state = nnx.state(model, filt)
      load_group(f, state)
      nnx.update(model, state)
    log.info(f"loaded {self.path}: base {base.path.name}, {model.num_experts} experts "
             f"{list(cfg.data.domains)}")
    return LoadedRun(cfg, base, model, fp)


def _check_router_shapes(f: Path, arrays: dict[str, np.ndarray], mcfg: ModelConfig,
                         ecfg: ExpertsConfig, rcfg: RouterConfig) -> None:
  """The router's tensors must be the ones the run's configuration builds (as loading it into
  the model checks for `generate` and `evaluate`): names and shapes."""
  abstract = nnx.eval_shape(lambda: SafeMoELM(mcfg, ecfg, rcfg, rngs=nnx.Rngs(0)))
  want = {".".join(str(x) for x in p): tuple(v.get_value().shape)
          for p, v in nnx.to_flat_state(nnx.state(abstract, RouterParam))}
  got = {k: tuple(v.shape) for k, v in arrays.items()}
  if got != want:
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    raise RunError(f"{f} does not match the run's router configuration: "
                   + "; ".join(f"{k}: expected {want.get(k)}, found {got.get(k)}"
                               for k in diff[:4])
                   + ". It was written for another model or router; train phase 2 again")


def _check_finite(f: Path, arrays: dict[str, np.ndarray]) -> None:
  if bad := nonfinite_names(arrays):
    raise RunError(f"{f} holds NaN or inf in {bad[:4]}: it is not a trained artifact and is "
                   f"not exported. Train the run again (the trainer now refuses to write such "
                   f"arrays)")
