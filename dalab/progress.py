"""Progress of a benchmark grid while it runs (``dalab bench``): runs done / total, failed,
diverged, running, elapsed time and an ETA.

The ETA is remaining training steps x seconds per step, over the workers. Seconds per step come
from what has been measured, best first: the wall time per step of the grid's finished runs of the
same method (set-up and evaluation included), of any finished run of the grid, and before the first
run finishes, a short probe (:func:`dalab.cost.probe`: a few synthetic training steps of one of the
grid's runs; steps only). The steps a running run has already done are read from its checkpoint
(``dalab.runs.checkpoint_step``, once per new checkpoint). Everything is read from the runs folder
-- done markers, records, failure notes, claims, checkpoints -- so it works for any launcher and
needs nothing from the workers.

On a terminal one bar line is redrawn in place (the workers' per-run lines clear it first, see
:func:`clear_line`); otherwise plain lines are printed -- at start, when the first ETA is known,
then at most once a minute when something changed, and at the end -- never a redraw.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from dalab import runs
from dalab.utils import duration

CLEAR = "\r\x1b[K"  # carriage return + erase line: where the bar was


def clear_line(stream: TextIO | None = None) -> str:
    """What a line printed under a redrawn bar starts with: :data:`CLEAR` on a terminal, else ""."""
    stream = stream or sys.stdout
    try:
        return CLEAR if stream.isatty() else ""
    except (AttributeError, ValueError):
        return ""


class GridProgress:
    """The overall progress line of a grid launch. ``todo``: the RunConfigs this launch trains;
    ``total``: the grid's size; ``done_ids``: its runs finished before this launch."""

    def __init__(self, runs_dir: str | Path, todo: list, total: int, done_ids: list[str], jobs: int,
                 since: float, stream: TextIO | None = None, interval: float | None = None,
                 plain_every: float = 60.0):
        self.rd = Path(runs_dir)
        self.todo = {c.run_id(): c for c in todo}
        self.total, self.done_before, self.jobs, self.since = total, len(done_ids), max(1, jobs), since
        self.stream = stream or sys.stdout
        self.tty = bool(clear_line(self.stream))
        self.interval = interval if interval is not None else (0.5 if self.tty else 1.0)
        self.plain_every = plain_every
        self.state: dict[str, str] = {}          # run id -> done / diverged / failed
        self.spent: dict[str, tuple[str, float]] = {}  # finished run id -> (method, wall seconds per step)
        self.ckpt: dict[str, tuple[float, int]] = {}   # running run id -> (checkpoint mtime, its step)
        self.probe_s: float | None = None
        self.t0 = time.time()
        self._printed: tuple[float, dict, bool] | None = None  # plain lines: (when, counts, had an ETA)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        for rid in done_ids:  # the grid's earlier runs: measured rates before anything finishes here
            self._measured(runs.read_record(runs.run_dir(self.rd, rid)) or {})

    # ------------------------------------------------------------------ what is known
    def _measured(self, rec: dict) -> None:
        tr = rec.get("train") or {}
        if rec.get("status") == "done" and rec.get("method") and tr.get("steps") and tr.get("wall_time_s"):
            self.spent[rec["run_id"]] = (rec["method"]["name"], tr["wall_time_s"] / tr["steps"])

    def poll(self) -> None:
        """Read the runs folder: newly finished or failed runs, and the running runs' checkpoints."""
        for rid in self.todo:
            if rid in self.state:
                continue
            if (self.rd / rid / "done").is_file() and runs.is_done(self.rd, rid):
                rec = runs.read_record(runs.run_dir(self.rd, rid)) or {}
                self.state[rid] = "diverged" if rec.get("status") == "diverged" else "done"
                self._measured(rec)
                self.ckpt.pop(rid, None)
                continue
            fail = runs.read_failure(self.rd, rid) if (self.rd / f"{rid}.failed").is_file() else None
            if fail and fail.get("time", 0) >= self.since:
                self.state[rid] = "failed"
                self.ckpt.pop(rid, None)
                continue
            if runs.claim_path(self.rd, rid).is_file():
                ck = self.rd / rid / "checkpoint.pt"
                try:
                    mtime = ck.stat().st_mtime
                except OSError:
                    continue
                if self.ckpt.get(rid, (None,))[0] != mtime:
                    step = runs.checkpoint_step(self.rd / rid)
                    if step is not None:
                        self.ckpt[rid] = (mtime, step)

    def rate(self, method: str) -> tuple[float | None, str]:
        """Seconds per step of ``method``'s runs and where the figure comes from."""
        same = [s for m, s in self.spent.values() if m == method]
        if same:
            return sum(same) / len(same), "measured"
        if self.spent:
            return sum(s for _, s in self.spent.values()) / len(self.spent), "measured"
        return (self.probe_s, "probe") if self.probe_s else (None, "")

    def eta(self) -> tuple[float | None, str]:
        """(seconds left, how it was estimated), or (None, why not yet)."""
        left = {rid: c for rid, c in self.todo.items() if rid not in self.state}
        if not left:
            return 0.0, ""
        work, how = 0.0, set()
        for rid, c in left.items():
            s, src = self.rate(c.method)
            if s is None:
                return None, "once a run has finished"
            work += s * max(0, c.steps - self.ckpt.get(rid, (0, 0))[1])
            how.add(src)
        n = len(self.spent)
        src = f"measured on {n} run{'s' if n != 1 else ''}" if how == {"measured"} else "probe: training steps only"
        return work / min(self.jobs, len(left)), src

    def counts(self) -> dict[str, int]:
        st = list(self.state.values())
        running = sum(1 for rid in self.todo if rid not in self.state and runs.claim_path(self.rd, rid).is_file())
        return {"done": self.done_before + st.count("done") + st.count("diverged"), "failed": st.count("failed"),
                "diverged": st.count("diverged"), "running": running}

    def line(self, final: bool = False) -> str:
        c = self.counts()
        eta, how = self.eta()
        parts = [f"{c['done']}/{self.total} runs done", f"{c['failed']} failed"]
        if c["diverged"]:
            parts.append(f"{c['diverged']} diverged")
        if not final:
            parts.append(f"{c['running']} running")
        tail = f"elapsed {duration(time.time() - self.t0)}"
        if not final and eta != 0.0:  # 0: every run finished, the workers are exiting
            tail += f", ETA {duration(eta)} ({how})" if eta is not None else f", ETA {how}"
        if self.tty:
            width = 24
            filled = int(width * c["done"] / max(self.total, 1))
            return f"[{'#' * filled}{'.' * (width - filled)}] " + ", ".join(parts) + "; " + tail
        return "progress: " + ", ".join(parts) + "; " + tail

    # ------------------------------------------------------------------ output
    def show(self, final: bool = False) -> None:
        """Redraw the bar (terminal), or print a plain line: the first, the first with an ETA, the
        last, and in between at most one per ``plain_every`` seconds when the counts changed."""
        with self._lock:
            text = self.line(final)
            if self.tty:
                self.stream.write(CLEAR + text + ("\n" if final else ""))
            else:
                counts, has_eta, now = self.counts(), self.eta()[0] is not None, time.time()
                due = (self._printed is None or final or (has_eta and not self._printed[2])
                       or (counts != self._printed[1] and now - self._printed[0] >= self.plain_every))
                if not due:
                    return
                self._printed = (now, counts, has_eta)
                self.stream.write(text + "\n")
            self.stream.flush()

    def probe(self, device: str = "auto", threads: int | None = None) -> None:
        """Seconds per training step from a few synthetic steps of one of the runs (the grid's
        dann run if it has one, as the dry run's estimate). Never raises: without it the ETA waits
        for the first measurements."""
        import torch

        from dalab.cost import probe

        cfgs = list(self.todo.values())
        if not cfgs:
            return
        cfg = next((c for c in cfgs if c.method == "dann"), cfgs[0])
        shape = (3, 28, 28) if cfg.backbone.startswith("lenet") else (3, 224, 224)
        old = torch.get_num_threads()
        try:
            if threads:
                torch.set_num_threads(threads)
            with torch.random.fork_rng(devices=[]):  # the runs' own seeding stays untouched
                self.probe_s = probe(cfg, shape, 10, device, steps=2, warmup=1)["step_s"]
        except Exception:  # noqa: BLE001 -- an estimate only
            self.probe_s = None
        finally:
            torch.set_num_threads(old)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()
            self.show()

    def start(self, probe: bool = True, device: str = "auto", threads: int | None = None) -> "GridProgress":
        """Print the first line now; with ``probe``, time a few training steps here first (before
        the workers start, so it has the machine to itself: an ETA within seconds) and print the
        line with that ETA; then keep the line current from a background thread."""
        self.show()
        if probe:
            self.probe(device, threads)
            self.show()
        self._thread = threading.Thread(target=self._loop, name="dalab-progress", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.poll()
        self.show(final=True)

    def __enter__(self) -> "GridProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
