"""Resumable and sharded evaluation: per-sample results appended to files in the output folder.

``crop eval`` appends every finished answer (and every localizer answer) to a JSONL progress file
in its output folder, flushed and fsynced after each batch, and writes a fingerprint of what it
evaluates (``eval_spec.json``: the spec, the model and localizer names, and the answerer's device
type, dtype and attention implementation, :func:`runtime_settings`) before the first answer.
Running the same command on the same folder reads what is done, skips it and runs the rest, so a
killed run ends with the same ``results.json`` as an uninterrupted one. Another spec is refused.

Under ``torchrun`` / ``accelerate launch`` (``RANK`` and ``WORLD_SIZE`` in the environment) each
process takes every ``WORLD_SIZE``-th batch (the batches are those of a one-process run, so every
answer is computed in the same batch as there) and writes its own file, ``progress.rank<R>.jsonl``;
rank 0 waits until every row is in some file and merges them in sample order.

Lines of a progress file (one JSON object each):

* ``{"loc": i, "id": ..., "box": [x0, y0, x1, y1, grid], "fallback": ..., "raw": ...}``: the
  localizer's answer for sample ``i`` (saved, so a resumed run never pays for the localizer twice);
* ``{"run": r, "header": {...}}``: run ``r``'s method and budget (informational; rank 0 recomputes it);
* ``{"run": r, "i": i, "id": ..., "row": {...}}``: the prediction row of sample ``i`` in run ``r``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crop.localizers.base import Localization
from crop.regions import GridBox

logger = logging.getLogger(__name__)

SPEC_FILE = "eval_spec.json"
"""The fingerprint of the evaluation a folder holds."""


@dataclass(frozen=True)
class Shard:
    """This process's share of an evaluation.

    Args:
        rank: this process's index, ``0 <= rank < world_size``.
        world_size: the number of processes.

    Raises:
        ValueError: for a rank outside ``[0, world_size)``.
    """

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"bad shard: rank {self.rank} of world size {self.world_size}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Shard:
        """The shard ``torchrun`` / ``accelerate launch`` gave this process (``RANK``, ``WORLD_SIZE``).

        Args:
            environ: the environment (default ``os.environ``).

        Returns:
            ``Shard(RANK, WORLD_SIZE)``, or ``Shard(0, 1)`` outside a launcher.
        """
        env = os.environ if environ is None else environ
        return cls(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")))

    def batches(self, n: int, batch_size: int) -> list[int]:
        """The start indices of this process's batches: every ``world_size``-th batch of a one-process run.

        Args:
            n: number of samples.
            batch_size: samples per batch.

        Returns:
            The first sample index of each of this process's batches.
        """
        return list(range(0, n, batch_size))[self.rank::self.world_size]


def runtime_settings(device: Any = "cpu", dtype: Any = "auto", attn_implementation: str = "sdpa",
                     device_map: str | None = None) -> dict[str, Any]:
    """Where and how the answerer runs, as a fingerprint records it: device type, dtype, attention implementation.

    The same words ``crop eval`` takes (``--device``, ``--dtype``, ``--attn``, ``--device-map``),
    resolved as the model loader resolves them, so ``auto`` on a GPU machine and ``cuda`` give the
    same settings. The device is its type (``cuda``, not ``cuda:1``): under a launcher each rank
    runs on its own GPU index, and every rank must write the same fingerprint. Answers differ with
    each of these (bfloat16 against float32, SDPA against eager attention rounding), so rows
    computed under one must not be merged with rows computed under another.

    Args:
        device: a ``--device`` word or a :class:`torch.device` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``).
        dtype: a ``--dtype`` word or a :class:`torch.dtype` (``auto``, ``float32``, ``bfloat16``, ``float16``).
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``.
        device_map: ``--device-map`` (``auto`` spreads the model itself), or ``None``.

    Returns:
        ``{"device": ..., "dtype": ..., "attn_implementation": ...}`` (plus ``"device_map"`` when one is given).

    Raises:
        CropInputError: for a device this machine does not have or a dtype it cannot run there.
    """
    from crop.models.loading import resolve_device, resolve_dtype

    target = resolve_device(device)
    settings = {"device": target.type, "dtype": str(resolve_dtype(dtype, target)).removeprefix("torch."),
                "attn_implementation": str(attn_implementation)}
    if device_map is not None:
        settings["device_map"] = device_map
    return settings


def fingerprint(spec: Any, model_name: str, localizer_name: str,
                runtime: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What an evaluation's results depend on (no git hash, no device index): equal fingerprints may share a folder.

    Args:
        spec: the :class:`crop.eval.runner.EvalSpec`.
        model_name, localizer_name: the answerer and localizer names, as given.
        runtime: the answerer's device type, dtype and attention implementation
            (:func:`runtime_settings`). ``None`` records none of them (a caller that does not
            know them must not write a guess that a later run would be compared against).

    Returns:
        A JSON-ready dict.
    """
    settings = dict(runtime or {})
    return json.loads(json.dumps({"model": model_name, "localizer": localizer_name, **settings, **spec.__dict__}))


class SpecMismatch(ValueError):
    """The output folder holds progress of another evaluation."""


class ProgressStore:
    """The progress files of one output folder, seen from one process.

    Args:
        folder: the output folder.
        shard: this process's shard (its own file is ``progress.jsonl`` alone, else
            ``progress.rank<R>.jsonl``).
    """

    def __init__(self, folder: str | os.PathLike[str], shard: Shard | None = None) -> None:
        self.folder = Path(folder)
        self.shard = shard or Shard()
        name = "progress.jsonl" if self.shard.world_size == 1 else f"progress.rank{self.shard.rank}.jsonl"
        self.path = self.folder / name
        self.locs: dict[int, Localization] = {}
        self.rows: dict[tuple[int, int], dict[str, Any]] = {}
        self.headers: dict[int, dict[str, Any]] = {}

    def files(self) -> list[Path]:
        """Every progress file in the folder, whichever process wrote it.

        Returns:
            Their paths, sorted.
        """
        return sorted(self.folder.glob("progress*.jsonl"))

    def prepare(self, fp: dict[str, Any], fresh: bool = False) -> None:
        """Check (or write) the folder's fingerprint, and read what is done.

        Args:
            fp: this evaluation's :func:`fingerprint`.
            fresh: drop earlier progress instead of resuming it (each process drops its own file,
                rank 0 also those of other process counts) and read none of it.

        Raises:
            SpecMismatch: when the folder holds progress of another evaluation (one line, naming
                what differs and how to start fresh).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        spec_path = self.folder / SPEC_FILE
        if fresh:
            mine = {self.path} if self.shard.rank else set(self.files()) - {
                self.folder / f"progress.rank{r}.jsonl" for r in range(1, self.shard.world_size)}
            for path in mine:
                path.unlink(missing_ok=True)
        elif spec_path.exists():
            old = json.loads(spec_path.read_text(encoding="utf-8"))
            if old != fp:
                keys = [k for k in dict.fromkeys([*old, *fp]) if old.get(k) != fp.get(k)]
                diff = "; ".join(f"{k}: {old.get(k)!r} there, {fp.get(k)!r} now" for k in keys)
                raise SpecMismatch(f"{self.folder} holds progress of another evaluation ({diff}): use another "
                                   f"--out, delete the folder, or pass --fresh to start over in it")
        elif self.files():
            raise SpecMismatch(f"{self.folder} has progress files but no {SPEC_FILE}: use another --out, delete "
                               f"the folder, or pass --fresh to start over in it")
        tmp = spec_path.with_name(f"{SPEC_FILE}.{os.getpid()}.tmp")  # every process writes the same, atomically
        tmp.write_text(json.dumps(fp, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, spec_path)
        if not fresh:  # fresh: nothing is read (another process may not have dropped its old file yet)
            self._drop_torn_tail()
            self.reload()

    def _drop_torn_tail(self) -> None:
        """Cut this process's own file after its last newline: a line torn by a kill is dropped, not appended to."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            logger.info("dropping a half-written last line of %s", self.path)
            with self.path.open("r+b") as f:
                f.truncate(end)

    def reload(self) -> None:
        """Read every progress file of the folder into :attr:`locs` and :attr:`rows` (first copy of a key wins).

        Raises:
            ValueError: for a broken line that is not the last of its file.
        """
        for path in self.files():
            lines = path.read_bytes().split(b"\n")
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except ValueError:
                    if number == len(lines):  # unterminated last line: a write cut short, ignored
                        continue
                    raise ValueError(f"{path}:{number}: broken progress line; delete the folder or pass "
                                     f"--fresh") from None
                self._record(item)

    def append(self, items: Iterable[dict[str, Any]]) -> None:
        """Append lines to this process's file, then flush and fsync (one call per batch).

        ``loc`` and ``row`` items are also recorded in :attr:`locs` / :attr:`rows`, as they will read back.

        Args:
            items: progress lines (see the module docstring).
        """
        text = "".join(json.dumps(item, separators=(",", ":")) + "\n" for item in items)
        if not text:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        for line in text.splitlines():  # read back, so rows in memory equal rows read from the file
            self._record(json.loads(line))

    def _record(self, item: dict[str, Any]) -> None:
        """Keep one progress line in memory (the first copy of a key wins)."""
        if "loc" in item:
            box = GridBox.from_list(item["box"][:4], item["box"][4])
            self.locs.setdefault(item["loc"], Localization(box, item["fallback"], item["raw"]))
        elif "row" in item:
            self.rows.setdefault((item["run"], item["i"]), item["row"])
        elif "header" in item:
            self.headers.setdefault(item["run"], item["header"])

    def wait_for(self, locs: int, rows: Iterable[tuple[int, int]], poll_s: float = 2.0) -> None:
        """Block until every localization ``0..locs-1`` and every row key is in some progress file.

        Rank 0 calls this before merging; the launcher ends every process when one fails.

        Args:
            locs: the number of localizations needed (0 for none).
            rows: the ``(run, sample index)`` keys needed.
            poll_s: seconds between reads.
        """
        needed = set(rows)
        last_log = 0.0
        while True:
            missing = [i for i in range(locs) if i not in self.locs] + [k for k in needed if k not in self.rows]
            if not missing:
                return
            if time.monotonic() - last_log > 60:
                logger.info("waiting for the other processes: %d results to go", len(missing))
                last_log = time.monotonic()
            time.sleep(poll_s)
            self.reload()


def loc_item(i: int, sample_id: Any, loc: Localization) -> dict[str, Any]:
    """The progress line of sample ``i``'s localization.

    Args:
        i: the sample's index.
        sample_id: its id.
        loc: the localizer's answer.

    Returns:
        A JSON-ready dict.
    """
    b = loc.box
    return {"loc": i, "id": sample_id, "box": [b.x0, b.y0, b.x1, b.y1, b.grid], "fallback": loc.fallback,
            "raw": loc.raw}
