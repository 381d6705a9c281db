"""One command on many processes: ``torchrun ... -m mmai -- predict|preprocess ...``.

Under torchrun (``WORLD_SIZE`` > 1 in the environment) each rank takes the cases at positions
``rank, rank + world, ...`` (the ``--shard rank/world`` rule) and writes its own part file next to
the output (``<out stem>.rank<r>of<w><suffix>``, resumable like the output itself); after a
barrier rank 0 merges the parts into the ONE output a single process would have written (same
rows, same order) and removes them. A rerun resumes: the rows of the merged output and of any
part left by a killed run count as done. Multi-node works the same way (torchrun's rendezvous)
as long as the output folder is shared by the nodes. Without torchrun nothing here is active.

``--shard I/N`` is the other way (independent jobs: a SLURM array, a Kubernetes indexed job;
docs/scaling.md); the two do not combine.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from mmai.errors import MmaiError

log = logging.getLogger(__name__)

_INSIDE: contextvars.ContextVar[bool] = contextvars.ContextVar("mmai_rank_inside", default=False)
_CASES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("mmai_rank_cases", default=None)
TIMEOUT = timedelta(days=7)  # the barrier waits for the slowest rank's whole share


@dataclass(frozen=True)
class RankJob:
    """This process's place in a torchrun job: ``rank`` of ``world``, ``local_rank`` on its node."""

    rank: int
    world: int
    local_rank: int

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world

    def device(self, device: str | None) -> str | None:
        """``cuda`` -> ``cuda:<local rank>`` (one GPU per process); anything else unchanged."""
        return f"cuda:{self.local_rank}" if device == "cuda" else device

    def part(self, path: Path) -> Path:
        """This rank's part file of an output file."""
        return path.with_name(f"{_stem(path)}.rank{self.rank}of{self.world}{_suffix(path)}")


def _suffix(path: Path) -> str:
    return ".csv" if path.name.endswith(".csv") else path.suffix


def _stem(path: Path) -> str:
    return path.name[: len(path.name) - len(_suffix(path))] if _suffix(path) else path.name


def part_files(path: Path) -> list[Path]:
    """Every part file of an output (any rank and world: a rerun with another process count
    still finds the rows of an earlier, killed job)."""
    return sorted(p for p in path.parent.glob(f"{_stem(path)}.rank*of*{_suffix(path)}")
                  if ".errors" not in p.name[len(_stem(path)):] and ".join" not in p.name[len(_stem(path)):])


def rank_job(shard: tuple[int, int] | None) -> RankJob | None:
    """The torchrun job this process is part of, or None (one process, or already inside a rank's share).

    Raises:
        MmaiError: ``--shard`` given as well (the two ways of splitting do not combine).
    """
    from mmai.engine.distributed import env_info

    rank, local_rank, world = env_info()
    if world <= 1 or _INSIDE.get():
        return None
    if shard is not None:
        raise MmaiError(f"--shard {shard[0]}/{shard[1]} under torchrun ({world} processes): use one way of "
                        "splitting the cases; torchrun already gives each process its share")
    return RankJob(rank, world, local_rank)


def note_cases(case_ids: Sequence[Any]) -> None:
    """Called by predict with the case ids of its share, in order (used to restore the global order)."""
    _CASES.set([str(c) for c in case_ids])


@contextlib.contextmanager
def _group() -> Iterator[Any]:
    """torch.distributed with gloo (files are merged on the CPU, whatever device the model uses)."""
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    try:
        yield dist
    finally:
        if own:
            dist.destroy_process_group()


@contextlib.contextmanager
def _inside() -> Iterator[None]:
    token = _INSIDE.set(True)
    cases = _CASES.set(None)
    try:
        yield
    finally:
        _INSIDE.reset(token)
        _CASES.reset(cases)


def _gather(dist: Any, obj: Any, world: int) -> list[Any]:
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _interleave(lists: Sequence[Sequence[Any]]) -> list[Any]:
    """Round-robin merge: item k of list r was at position r + k * len(lists)."""
    out = []
    for k in range(max((len(x) for x in lists), default=0)):
        out += [x[k] for x in lists if k < len(x)]
    return out


def _read_rows(path: Path) -> pd.DataFrame | None:
    """A CSV's rows as strings (a torn last line without its line end is dropped), None if absent."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    text = path.read_text()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)


def _write_rows(df: pd.DataFrame, path: Path) -> None:
    from mmai.utils import atomic_path

    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)


def _sum_summaries(summaries: list[Any], **final: Any) -> Any:
    """One summary of the whole job: counts added up, paths those of the merged outputs."""
    first = summaries[0]
    counts = {f.name: sum(getattr(s, f.name) for s in summaries) for f in fields(first)
              if f.name.startswith("n_")}
    return replace(first, **counts, **final)


# ---------------------------------------------------------------------------------------------- predict


def predict_ranked(job: RankJob, predict: Callable[..., Any], *, out_csv: Path, device: str | None,
                   **kwargs: Any) -> Any:
    """Run ``predict`` (``mmai.inference.predictor.predict_from_files``) on this rank's share into its
    part file, then merge every part into ``out_csv`` on rank 0. Returns the job's summed summary."""
    from mmai.inference.pipelined import default_workers
    from mmai.inference.predictor import errors_path_for, join_path_for

    if kwargs.get("workers") is None:  # the node's cores shared by its ranks
        kwargs["workers"] = max(1, default_workers() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", job.world))))
    out_csv = Path(out_csv)
    part = job.part(out_csv)
    if out_csv.exists() and not part.exists():  # rows of the merged output count as done for this rank
        prior = _read_rows(out_csv)
        if prior is not None and len(prior):
            _write_rows(prior, part)
    with _group() as dist, _inside():
        summary = predict(out_csv=part, device=job.device(device), shard=job.shard, **kwargs)
        cases = _CASES.get() or []
        dist.barrier()
        every = _gather(dist, (cases, summary), job.world)
        if job.rank == 0:
            _merge_predictions(out_csv, part_files(out_csv),
                               [out_csv.with_name(_part_name(out_csv, r, job.world)) for r in range(job.world)],
                               [c for c, _ in every])
        dist.barrier()
    summaries = [s for _, s in every]
    err = errors_path_for(out_csv)
    n_failed = sum(s.n_failed for s in summaries)
    join = join_path_for(out_csv) if any(s.join for s in summaries) else None
    merged = _sum_summaries(summaries, out=str(out_csv), errors=str(err) if n_failed else None,
                            join=str(join) if join else None)
    return merged


def _part_name(path: Path, rank: int, world: int) -> str:
    return f"{_stem(path)}.rank{rank}of{world}{_suffix(path)}"


def _merge_predictions(out_csv: Path, parts: list[Path], this_job: list[Path], cases: list[list[str]]) -> None:
    """Rank 0: merged output = its earlier rows, then this job's new rows in the global case order;
    errors of this job in one file (selection errors first, as one process writes them)."""
    from mmai.inference.predictor import errors_path_for, join_path_for

    order = {c: i for i, c in enumerate(_interleave(cases))}
    prior = _read_rows(out_csv)
    frames = [f for f in (_read_rows(p) for p in parts) if f is not None]
    new = pd.concat(frames, ignore_index=True) if frames else None
    if new is not None:
        done = set(prior["case_id"]) if prior is not None else set()
        new = new[~new["case_id"].isin(done)].drop_duplicates("case_id")
        new = new.assign(_pos=new["case_id"].map(order).fillna(len(order))).sort_values("_pos", kind="stable")
        merged = pd.concat([prior, new.drop(columns="_pos")], ignore_index=True) if prior is not None \
            else new.drop(columns="_pos")
        _write_rows(merged, out_csv)
    errs = [_read_rows(errors_path_for(p)) for p in this_job]
    err_path = errors_path_for(out_csv)
    if any(e is not None for e in errs):
        frames = [e for e in errs if e is not None]
        select = _interleave([e[~e["case_id"].isin(order)].to_dict("records") if e is not None else []
                              for e in errs])
        rest = pd.concat([e[e["case_id"].isin(order)] for e in frames], ignore_index=True)
        rest = rest.assign(_pos=rest["case_id"].map(order)).sort_values("_pos", kind="stable").drop(columns="_pos")
        _write_rows(pd.concat([pd.DataFrame(select, columns=frames[0].columns), rest], ignore_index=True),
                    err_path)
    elif err_path.exists():
        err_path.unlink()
    joins = [join_path_for(p) for p in this_job]
    if joins[0].exists():
        joins[0].replace(join_path_for(out_csv))
    for p in [*parts, *this_job, *(errors_path_for(p) for p in this_job), *joins[1:]]:
        p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- preprocess


def preprocess_ranked(job: RankJob, preprocess: Callable[..., Any], df: pd.DataFrame, config: Any, out_dir: Path,
                      *, fit_stats: Callable[[], Any] | None, **kwargs: Any) -> Any:
    """Run ``preprocess`` (``mmai.preprocess.preprocess_frame``) on this rank's share (its
    ``manifest.shard<r>of<w>.csv``), then merge the shard manifests / errors into
    ``manifest.csv`` / ``errors.csv`` on rank 0, in the input order. ``fit_stats``: rank 0 fits the
    intensity statistics first (``intensity.kind: percentile``), the others wait for them."""
    out_dir = Path(out_dir)
    with _group() as dist, _inside():
        if fit_stats is not None:
            if job.rank == 0:
                fit_stats()
            dist.barrier()
        device = kwargs.pop("device", "cpu")
        summary = preprocess(df, config, out_dir, shard=job.shard, device=job.device(device) or "cpu", **kwargs)
        dist.barrier()
        every = _gather(dist, summary, job.world)
        if job.rank == 0:
            order = {str(c): i for i, c in enumerate(df["case_id"])}
            for name in ("manifest", "errors"):
                shards = [out_dir / f"{name}.shard{r}of{job.world}.csv" for r in range(job.world)]
                _merge_in_order(shards, out_dir / f"{name}.csv", order)
        dist.barrier()
    n_prior = len(kwargs.get("prior_errors") or [])
    merged = _sum_summaries(every)
    # the selection errors were counted by every rank; once is right
    return replace(merged, n_cases=merged.n_cases - (job.world - 1) * n_prior,
                   n_failed=merged.n_failed - (job.world - 1) * n_prior, out_dir=str(out_dir))


def _merge_in_order(shards: list[Path], out: Path, order: dict[str, int]) -> None:
    frames = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in shards if p.exists()]
    if not frames:
        return
    merged = pd.concat(frames, ignore_index=True).drop_duplicates()
    pos = merged["case_id"].map(order)
    merged = merged.assign(_pos=pos.fillna(-1)).sort_values("_pos", kind="stable").drop(columns="_pos")
    _write_rows(merged, out)
    for p in shards:
        p.unlink()
