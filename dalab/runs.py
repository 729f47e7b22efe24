"""A run's folder, owned by this module and nowhere else.

``<runs_dir>/<run_id>/`` holds ``record.json`` (a :class:`dalab.record.RunRecord`, strict JSON,
written atomically by :func:`write_record` and read by :func:`read_record`, nowhere else), ``checkpoint.pt``
(while the run is unfinished), ``model.pt`` (source-pretrained weights), ``tb/`` (TensorBoard) and,
written last, a ``done`` marker. Next to the folder, ``<run_id>.claim`` says which process trains
the run right now, ``<run_id>.failed`` why its last attempt raised.

Guarantees (tested in tests/test_robustness.py):

- a run is *done* only when its ``done`` marker exists AND its record parses and is complete; a
  truncated record means the run is redone;
- every file is written to a temporary name unique to the writing process, then renamed: a reader
  (or a second process, or a full disk) never sees half a file, and two processes never share a
  temporary file;
- an unreadable checkpoint or weight file is moved aside (kept, renamed ``*.corrupt-<time>``) with a
  warning, and the run restarts from scratch instead of failing forever;
- a claim is an exclusively created file; it is stale (taken over) when its process died on this
  host, when its pid now names another process (started after the claim's holder: a reboot or a
  container restart reuses pids), when it is empty or unparsable for more than
  :data:`CLAIM_EMPTY_STALE_S` (its writer died between create and write), or when nobody refreshed
  it for :data:`CLAIM_TTL_S`, on any host (a holder refreshes its claims every
  :data:`CLAIM_HEARTBEAT_S` from a background thread);
- a full disk is one line (:class:`dalab.utils.NoSpace`) naming the folder, and leaves no
  half-written file and no empty claim behind;
- a finished run is never destroyed by a rerun: ``dalab run --force`` moves it to
  ``<run_id>.previous/``, which stands in for it until the new attempt has finished;
- SIGINT, SIGTERM and SIGUSR1 (Slurm's warning before the time limit) only *request* a stop: the
  trainer finishes the current step, writes a checkpoint and raises :class:`Interrupted`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from dalab.record import RECORD_VERSION, RunRecord  # noqa: F401 -- RECORD_VERSION re-exported
from dalab.utils import no_space, resolve_precision, temp_file

CLAIM_EMPTY_STALE_S = 5.0
CLAIM_TTL_S = 15 * 60.0
CLAIM_HEARTBEAT_S = 60.0


# --------------------------------------------------------------------------- identity

# How a run's canonical config (hence its id) names the precision the run computes in. Ids once
# hashed the *requested* precision; every committed run that computed bf16 had requested ``auto``
# (on a bf16 machine), so bf16 keeps that spelling and those ids stay valid. fp32 is ``fp32``
# whether it was asked for or ``auto`` resolved to it (old ``--precision bf16`` ids are redone once).
KEYED_PRECISION = {"fp32": "fp32", "bf16": "auto"}


def precision_key(precision: str, device: str = "auto") -> str:
    """The canonical config's ``precision``: what ``precision`` resolves to on ``device`` (as
    ``--device`` takes it), spelled as in :data:`KEYED_PRECISION`."""
    p = resolve_precision(precision, device)
    return KEYED_PRECISION.get(p, p)


@dataclass
class RunConfig:
    """Everything that defines a run, and therefore its id."""

    method: str
    source: str                     # one domain, or several joined by "+" (dalab.tasks.source_domains)
    target: str
    seed: int = 0
    budget: str = "0"               # target labels: "0", k per class, or "all"
    steps: int = 2000
    eval_every: int = 250
    backbone: str = "lenet"
    pretrained: str | None = None   # local ImageNet weights (ResNets only)
    split_seed: int = 0             # the data split is fixed across run seeds
    precision: str = "auto"         # auto | fp32 | bf16 (autocast); auto = bf16 where the device has it
    hparams: dict[str, Any] = field(default_factory=dict)  # overrides of the defaults
    # overrides of the source_only run a method with init_from_source starts from (else ignored)
    source_hparams: dict[str, Any] = field(default_factory=dict)
    # the task's label-set split (dalab.tasks.LabelSet.key(): shared / source_private / target_private
    # class indices); None = closed-set over all classes, and then not part of the canonical config
    classes: dict[str, list[int]] | None = None

    def source_run_hparams(self, hp: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The hyperparameter overrides of the ``source_only`` run this run starts from (None if it
        starts from scratch): ``source_hparams``, with this run's input standardisation (the source
        model must have seen inputs normalised as this run normalises them)."""
        from dalab.methods import get_method, resolve_hparams

        cls = get_method(self.method)
        hp = hp if hp is not None else resolve_hparams(cls, self.hparams)
        if not cls.starts_from_source(hp):
            return None
        return {**self.source_hparams, "standardize": hp["standardize"]}

    @property
    def sources(self) -> list[str]:
        """The task's source domains, in order (:func:`dalab.tasks.source_domains`: ``source`` is one
        domain, or several joined by ``+``)."""
        from dalab.tasks import source_domains

        return source_domains(self.source)

    def label_set(self):
        """The task's :class:`dalab.tasks.LabelSet`, or None (closed-set over all classes)."""
        from dalab.tasks import LabelSet

        return LabelSet.from_key(self.classes) if self.classes else None

    def for_device(self, device: str) -> "RunConfig":
        """This config with its precision resolved for ``device`` (``--device``): what the run will
        compute in there, which the id names. An unresolved ``auto`` is resolved for the default
        device (CUDA when present, else the CPU) when the id is computed."""
        from dataclasses import replace

        return replace(self, precision=resolve_precision(self.precision, device))

    def key(self) -> dict[str, Any]:
        """The canonical configuration: hyperparameters resolved (typed, every default filled in),
        so ``--set lr=0.01``, a spec's ``lr: 1e-2`` and not stating the default give one key; the
        precision resolved (:func:`precision_key`), so ``auto`` on an fp32-only machine is the run
        ``fp32`` is, and a bf16 run is never taken for an fp32 one."""
        from dalab.methods import METHODS, get_method, resolve_hparams
        from dalab.methods.base import keyed_hparams

        cls = get_method(self.method)
        hp = resolve_hparams(cls, self.hparams)
        d = asdict(self)
        d["budget"] = str(d["budget"])
        d["precision"] = precision_key(self.precision)
        d["hparams"] = keyed_hparams(cls, hp)
        src = self.source_run_hparams(hp)
        d["source_hparams"] = (keyed_hparams(METHODS["source_only"], resolve_hparams(METHODS["source_only"], src))
                               if src is not None else None)
        if self.classes is None:  # closed-set over all classes: the key (and id) every earlier run has
            del d["classes"]
        else:
            d["classes"] = self.label_set().key()
        return d

    def run_id(self) -> str:
        """Deterministic, readable id: a hash of the canonical config behind the main fields."""
        return key_id(self.key())


def key_id(key: dict[str, Any]) -> str:
    """The run id of a canonical config (:meth:`RunConfig.key`, what a record stores as ``config``)."""
    from dalab.tasks import id_tag

    h = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return f"{key['method']}__{key['source']}-{key['target']}{id_tag(key)}__b{key['budget']}__s{key['seed']}__{h}"


def run_dir(runs_dir: str | os.PathLike, run_id: str) -> Path:
    return Path(runs_dir) / run_id


# --------------------------------------------------------------------------- files

def _tmp_path(path: Path) -> Path:
    """A temporary name next to ``path`` that no other process or thread uses (created with the
    permissions the umask gives new files)."""
    return temp_file(path, prefix=f".{path.name}.{os.getpid()}.")


def atomic_save(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename onto ``path``: readers see the old file or the new one. A failure
    (full disk, a signal) leaves the old file untouched and no temporary behind; a full disk is
    raised as one line (:class:`dalab.utils.NoSpace`), whatever torch made of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = no_space(e, path.parent)  # before the half-written file is removed: the disk is full now
        tmp.unlink(missing_ok=True)
        if full is not None:
            raise full from None
        raise


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def move_aside(path: Path, why: str) -> Path:
    """Rename an unreadable file to ``<name>.corrupt-<time>`` (kept for inspection) and warn."""
    dest = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, dest)
    warn(f"{path} is unreadable ({why}); moved to {dest.name}")
    return dest


def save_torch(path: Path, obj: Any) -> None:
    import torch

    atomic_save(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path: Path, map_location="cpu", weights_only: bool = True, required: tuple = ()) -> Any | None:
    """The object in ``path``, or None when there is none; an unreadable file (truncated, garbage,
    missing keys) is moved aside with a warning and None returned."""
    import torch

    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location=map_location, weights_only=weights_only)
        missing = [k for k in required if k not in obj]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        return obj
    except Exception as e:  # noqa: BLE001 -- any failure to read it means the same: not usable
        move_aside(path, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
        return None


CHECKPOINT_KEYS = ("step", "method", "evals", "rng")


def save_checkpoint(rdir: Path, state: dict) -> None:
    save_torch(rdir / "checkpoint.pt", state)


def load_checkpoint(rdir: Path, map_location) -> dict | None:
    """The run's checkpoint, or None (none, or unreadable: moved aside, the run restarts)."""
    return load_torch(rdir / "checkpoint.pt", map_location, weights_only=False, required=CHECKPOINT_KEYS)


def checkpoint_step(rdir: Path) -> int | None:
    """The step of the run's checkpoint (read lazily: tensors are memory-mapped), or None when
    there is none or it cannot be read (the trainer then moves it aside and starts over)."""
    import torch

    path = rdir / "checkpoint.pt"
    if not path.is_file():
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["step"])
    except Exception:  # noqa: BLE001 -- unreadable means the same as none here
        return None


def tensorboard_purge_step(rdir: Path, resume: bool) -> int | None:
    """``purge_step`` for the run's SummaryWriter: when ``tb/`` already holds a killed attempt's
    events, TensorBoard hides those at or after the step this attempt starts from (the step after
    its checkpoint, or 1 without one), so no step is shown twice. None when there are none."""
    tb = rdir / "tb"
    if not tb.is_dir() or not any(tb.iterdir()):
        return None
    return ((checkpoint_step(rdir) if resume else None) or 0) + 1


def remove_checkpoint(rdir: Path) -> None:
    (rdir / "checkpoint.pt").unlink(missing_ok=True)


def save_model(rdir: Path, state_dict: dict) -> None:
    save_torch(rdir / "model.pt", {k: v.detach().cpu() for k, v in state_dict.items()})


def load_model(rdir: Path) -> dict | None:
    """Saved weights, or None (none, or unreadable: moved aside with a warning)."""
    return load_torch(rdir / "model.pt", "cpu", weights_only=True)


# --------------------------------------------------------------------------- records

def write_record(rdir: Path, record: RunRecord | dict) -> None:
    """Write ``record.json`` (:meth:`RunRecord.to_text`, atomically). A dict (a hand-made record)
    goes through :meth:`RunRecord.from_dict`. A record that would not read back is never written:
    ValueError names what is wrong with it."""
    rec = record if isinstance(record, RunRecord) else RunRecord.from_dict(record)
    text = rec.to_text()
    RunRecord.from_text(text)
    atomic_save(rdir / "record.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_record(rdir: Path) -> dict | None:
    """The finished run's record as the dict the tables and selection rules index
    (:meth:`RunRecord.to_dict`), or None when it is missing or unreadable."""
    try:
        return RunRecord.from_text((rdir / "record.json").read_text(encoding="utf-8")).to_dict()
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def mark_done(rdir: Path, status: str) -> None:
    atomic_save(rdir / "done", lambda tmp: tmp.write_text(status + "\n"))


def computed_as_keyed(rec: dict) -> bool:
    """Whether the precision a record says its run computed in is the one its config (hence its
    id) names. A record with ``auto`` ids from before ids named the resolved precision may have
    computed in fp32: it is not the bf16 run that id now stands for."""
    keyed, computed = rec["config"].get("precision"), rec["train"].get("precision")
    return keyed is None or computed is None or KEYED_PRECISION.get(computed, computed) == keyed


def is_done(runs_dir: str | os.PathLike, run_id: str) -> bool:
    d = run_dir(runs_dir, run_id)
    if not (d / "done").is_file():
        return False
    rec = read_record(d)
    return rec is not None and computed_as_keyed(rec)


PREVIOUS = ".previous"  # suffix of a finished run's folder while ``dalab run --force`` retrains it


def set_aside(runs_dir: str | os.PathLike, run_id: str) -> Path:
    """Move a finished run's folder to ``<run_id>.previous`` (replacing an older one) before it is
    retrained: until the new attempt finishes, :func:`load_records` reads this one instead."""
    d = run_dir(runs_dir, run_id)
    prev = d.with_name(d.name + PREVIOUS)
    if prev.exists():
        import shutil
        shutil.rmtree(prev)
    os.replace(d, prev)
    return prev


def drop_previous(runs_dir: str | os.PathLike, run_id: str) -> None:
    """Remove the set-aside result of a run once its new attempt has finished."""
    import shutil

    prev = run_dir(runs_dir, run_id + PREVIOUS)
    if prev.is_dir() and (run_dir(runs_dir, run_id) / "done").is_file():
        shutil.rmtree(prev, ignore_errors=True)


def load_records(runs_dir: str | os.PathLike, report: bool = True) -> list[dict]:
    """Every finished run's record under ``runs_dir``. Folders with a ``done`` marker whose record
    cannot be read are left out and, with ``report``, counted in one warning line. A run being
    retrained with ``--force`` is represented by its previous result until the new one is done."""
    root = Path(runs_dir)
    out, unreadable = [], []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if d.name.endswith(PREVIOUS) and is_done(root, d.name[:-len(PREVIOUS)]):
            continue  # the new attempt finished (and the old folder is about to go)
        if d.is_dir() and (d / "done").is_file():
            rec = read_record(d)
            (out.append(rec) if rec is not None else unreadable.append(d.name))
    if unreadable and report:
        warn(f"{len(unreadable)} finished run(s) under {root} have an unreadable record.json and are left out: "
             f"{', '.join(unreadable[:5])}{' ...' if len(unreadable) > 5 else ''}; rerun their bench to redo them")
    return out


# --------------------------------------------------------------------------- failures

def write_failure(runs_dir: Path, run_id: str, error: str) -> None:
    text = json.dumps({"error": error, "time": time.time(), "host": socket.gethostname(), "pid": os.getpid()})
    atomic_save(Path(runs_dir) / f"{run_id}.failed", lambda tmp: tmp.write_text(text + "\n"))


def read_failure(runs_dir: Path, run_id: str) -> dict | None:
    try:
        return json.loads((Path(runs_dir) / f"{run_id}.failed").read_text())
    except (OSError, ValueError):
        return None


def clear_failure(runs_dir: Path, run_id: str) -> None:
    (Path(runs_dir) / f"{run_id}.failed").unlink(missing_ok=True)


# --------------------------------------------------------------------------- claims

_HELD: set[Path] = set()
_HELD_LOCK = threading.Lock()
_HEARTBEAT: threading.Thread | None = None


def claim_path(runs_dir: str | os.PathLike, run_id: str) -> Path:
    return Path(runs_dir) / f"{run_id}.claim"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_owner(runs_dir: str | os.PathLike, run_id: str) -> dict | None:
    """Who holds the claim ({pid, host, time}; {} while it is unreadable), or None if nobody."""
    path = claim_path(runs_dir, run_id)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        owner = json.loads(text)
        return owner if isinstance(owner, dict) else {}
    except ValueError:
        return {}


def _process_identity(pid: int) -> str | None:
    """``<boot id>:<start time>`` of a live process on this host (Linux /proc), or None: two
    processes with the same pid -- after a reboot or a container restart -- differ in it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"  # field 22, starttime (after the comm)
    except (OSError, IndexError):
        return None


def _stale(path: Path, owner: dict | None) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if not owner or "pid" not in owner:
        return age > CLAIM_EMPTY_STALE_S  # its writer died between create and write
    if age > CLAIM_TTL_S:  # any host: a live holder refreshes it every CLAIM_HEARTBEAT_S
        return True
    if owner.get("host") == socket.gethostname():
        try:
            pid = int(owner["pid"])
        except (TypeError, ValueError):
            return True
        if not _pid_alive(pid):
            return True
        # alive, but is it the holder? a reboot or container restart hands its pid to another process
        return "proc" in owner and _process_identity(pid) not in (None, owner["proc"])
    return False


@contextlib.contextmanager
def _claims_lock(runs_dir: Path) -> Iterator[None]:
    """Serialise stale-claim takeovers (check, remove, re-create) between processes."""
    import fcntl

    with open(runs_dir / ".claims.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# runs dirs this process created when claiming (see release_claim)
_CREATED: set[Path] = set()


def try_claim(runs_dir: str | os.PathLike, run_id: str) -> bool:
    """Atomically claim a run for this process (O_EXCL file); takes over a stale claim."""
    rd = Path(runs_dir)
    if not rd.exists():  # remembered: a run that fails before writing anything leaves no folder
        rd.mkdir(parents=True, exist_ok=True)
        _CREATED.add(rd)
    path = claim_path(rd, run_id)
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
                     "proc": _process_identity(os.getpid())})
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if attempt:
                return False
            with _claims_lock(rd):
                if not _stale(path, claim_owner(rd, run_id)):
                    return False
                path.unlink(missing_ok=True)
            continue
        try:
            with os.fdopen(fd, "w") as f:
                f.write(me)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:  # e.g. a full disk: no empty claim is left behind
            full = no_space(e, rd)
            path.unlink(missing_ok=True)
            if full is not None:
                raise full from None
            raise
        with _HELD_LOCK:
            _HELD.add(path)
        _start_heartbeat()
        return True
    return False


def release_claim(runs_dir: str | os.PathLike, run_id: str) -> None:
    path = claim_path(runs_dir, run_id)
    with _HELD_LOCK:
        held = path in _HELD
        _HELD.discard(path)
    owner = claim_owner(runs_dir, run_id)
    if held or (owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()):
        path.unlink(missing_ok=True)
    rd = Path(runs_dir)
    if rd in _CREATED:  # this process made the runs dir: remove it if nothing was written there
        _CREATED.discard(rd)
        try:
            rd.rmdir()
        except OSError:
            pass


def _start_heartbeat() -> None:
    global _HEARTBEAT
    if _HEARTBEAT is not None and _HEARTBEAT.is_alive():
        return

    def beat():
        while True:
            time.sleep(CLAIM_HEARTBEAT_S)
            with _HELD_LOCK:
                held = list(_HELD)
            for p in held:
                with contextlib.suppress(OSError):
                    os.utime(p)

    _HEARTBEAT = threading.Thread(target=beat, name="dalab-claim-heartbeat", daemon=True)
    _HEARTBEAT.start()


@contextlib.contextmanager
def claimed(runs_dir: str | os.PathLike, run_id: str) -> Iterator[bool]:
    """``with claimed(rd, rid) as ok:`` -- ok is whether this process holds the run; released on exit."""
    ok = try_claim(runs_dir, run_id)
    try:
        yield ok
    finally:
        if ok:
            release_claim(runs_dir, run_id)


def run_state(runs_dir: str | os.PathLike, run_id: str) -> str:
    """done (finished: marker + complete record), claimed (a live process is on it), failed (its
    last attempt raised), partial (started, unfinished: resumed or redone), or missing."""
    rd = Path(runs_dir)
    if is_done(rd, run_id):
        return "done"
    path = claim_path(rd, run_id)
    if path.exists() and not _stale(path, claim_owner(rd, run_id)):
        return "claimed"
    if (rd / f"{run_id}.failed").is_file():
        return "failed"
    return "partial" if run_dir(rd, run_id).exists() else "missing"


# --------------------------------------------------------------------------- interrupts

class Interrupted(KeyboardInterrupt):
    """A stop requested by a signal; the run's checkpoint (if any) is on disk. ``exit_code`` is
    the shell's 128 + signal number (130 for Ctrl-C)."""

    def __init__(self, signum: int, step: int | None = None):
        super().__init__(signum)
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, n))
_stop: dict[str, Any] = {"signum": None, "depth": 0}


def stop_requested() -> int | None:
    """The signal number of a pending stop request, or None."""
    return _stop["signum"]


def check_stop(step: int | None = None) -> None:
    """Raise :class:`Interrupted` if a stop was requested (call it where stopping is safe)."""
    if _stop["signum"] is not None:
        raise Interrupted(_stop["signum"], step)


def _on_signal(signum, frame) -> None:
    if _stop["signum"] == signal.SIGINT and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now
    _stop["signum"] = signum
    for cb in list(_stop.get("forward", ())):
        cb(signum)


@contextlib.contextmanager
def graceful_stop(signals: tuple = STOP_SIGNALS, forward: Callable[[int], None] | None = None) -> Iterator[None]:
    """Within the block, the ``signals`` only request a stop (see :func:`check_stop`); a second
    Ctrl-C raises at once. Nested use is fine; outside the main thread it does nothing.
    ``forward(signum)`` is called on each signal (e.g. to pass it on to worker processes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    prev = {}
    if _stop["depth"] == 0:
        _stop["signum"] = None
        for s in signals:
            prev[s] = signal.signal(s, _on_signal)
    _stop["depth"] += 1
    if forward:
        _stop.setdefault("forward", []).append(forward)
    try:
        yield
    finally:
        _stop["depth"] -= 1
        if forward:
            _stop["forward"].remove(forward)
        if _stop["depth"] == 0:
            for s, h in prev.items():
                signal.signal(s, h)
            _stop["signum"] = None


# --------------------------------------------------------------------------- dying with the parent

def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux
    PR_SET_PDEATHSIG); elsewhere a watchdog thread polls the parent pid. With SIGTERM the worker
    checkpoints its run, releases its claim and exits."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(sig), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        def watch():
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), sig)
        threading.Thread(target=watch, name="dalab-parent-watchdog", daemon=True).start()
    if os.getppid() != parent:  # the parent died before we asked
        os.kill(os.getpid(), sig)


# --------------------------------------------------------------------------- how to run (not identity)

@dataclass
class RunOptions:
    """How a run is executed -- never part of its identity. ``dalab run`` and ``dalab bench``
    build one from the same command-line options (:func:`dalab.cli.add_run_options`) and pass it
    to :func:`dalab.trainer.train` unchanged, so every run option reaches a benchmark's runs."""

    device: str = "auto"                # auto (cuda if available), cpu, cuda, cuda:N
    data_root: str | None = None        # root folder of datasets read from disk
    checkpoint_every: int | None = None  # write checkpoint.pt every N steps (bench: each run's eval_every)
    resume: bool = False                # continue from checkpoint.pt when present
    deterministic: bool = False         # deterministic GPU kernels (CPU runs are deterministic anyway)
    channels_last: bool = True          # NHWC layout for conv backbones
    compile: bool = False               # torch.compile the backbone
    progress: bool = True               # progress bar
    tensorboard: bool = True            # TensorBoard events under tb/
    log_every: int = 50                 # losses become host floats (and go to TensorBoard) every N steps
    save_model: bool = False            # also write model.pt (always for source_only)
    # label-free validators computed at every evaluation point (dalab.evaluation.UNSUPERVISED_SCORES);
    # None = all; a benchmark spec's `validators:` switches expensive ones off (absent from the record)
    validators: tuple[str, ...] | None = None
