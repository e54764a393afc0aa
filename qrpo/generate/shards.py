"""Shards, chunks and manifests: the on-disk layout that makes every step resumable.

    OUT/<step>/shard-00001-of-00004/plan.json             prompt ids per chunk, written first
    OUT/<step>/shard-00001-of-00004/chunk-000012.parquet  one chunk's rows, written atomically
    OUT/<step>/shard-00001-of-00004/manifest.json         counts and statistics, written last

The prompts of the input, in order of first appearance, go to shard `position % num_shards`;
the order is by source row, which every step keeps, so a prompt has the same shard in every
step and a step reads only its own shard of the step before (when the shard counts match).
A shard cuts its prompts into chunks of `chunk_size`; each chunk is written to a temporary name
and renamed (`os.replace` is atomic), so a chunk file is complete or absent. A rerun skips the
chunks that exist, so a killed shard resumes at the first missing chunk, and a finished shard
(manifest present) is not touched at all. `collect` reads a step's shards back and checks that
every planned chunk is there and every prompt and completion id occurs once.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qrpo.common.run_lock import LOCK_NAME, hold
from qrpo.generate.records import clean, features, units_of
from qrpo.generate.reuse import changed_keys, input_fingerprint

SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})$")
CHUNK_RE = re.compile(r"^chunk-(\d{6})\.parquet$")

# A worker turns one chunk's rows into output rows and says how many tokens it processed.
Worker = Callable[[list[dict]], tuple[list[dict], int]]


class ShardError(RuntimeError):
    """A shard cannot be run or read as asked; the message says which files and what to do."""


def resolve_shard(shard: int, num_shards: int, env: dict | None = None) -> tuple[int, int]:
    """Config values win; otherwise a SLURM array task's own index and count; otherwise 0 of 1."""
    env = os.environ if env is None else env
    if num_shards <= 0:
        num_shards = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    if shard < 0:
        task = env.get("SLURM_ARRAY_TASK_ID")
        shard = int(task) - int(env.get("SLURM_ARRAY_TASK_MIN", 0)) if task is not None else 0
    if not 0 <= shard < num_shards:
        raise ShardError(f"shard {shard} is not in [0, num_shards={num_shards})")
    return shard, num_shards


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}"


def chunk_name(index: int) -> str:
    return f"chunk-{index:06d}.parquet"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_rows_parquet(rows: list[dict], path: Path) -> None:
    """Rows -> Parquet through `datasets`, to a temporary name and then renamed into place."""
    import datasets

    feats = features()
    rows = [clean(r) for r in rows]
    if rows:
        ds = datasets.Dataset.from_list(rows, features=feats)
    else:  # from_list cannot type an empty list
        ds = datasets.Dataset.from_dict({k: [] for k in feats}, features=feats)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    quiet = datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        ds.to_parquet(str(tmp))
    finally:
        if quiet:
            datasets.enable_progress_bars()
    os.replace(tmp, path)


def read_rows_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


# --------------------------------------------------------------------------- statistics


def _stats(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
    return {
        "count": len(values),
        "mean": mean,
        "std": math.sqrt(var),
        "min": min(values),
        "max": max(values),
    }


def row_stats(rows: list[dict]) -> dict:
    """Counts, reward statistics and reference-set statistics of some rows."""
    comps = [c for r in rows for c in r["completions"]]
    refs = {r["prompt_id"]: r["ref_rewards"] for r in rows}
    return {
        "prompts": len(refs),
        "rows": len(rows),
        "completions": len(comps),
        "reward": _stats([c["reward"] for c in comps if c["reward"] is not None]),
        "ref_rewards_per_prompt": _stats([float(len(v)) for v in refs.values()]),
        # Prompts whose reference rewards all tie carry no quantile information.
        "tied_prompts": sum(1 for v in refs.values() if len(v) > 1 and len(set(v)) == 1),
        "ref_logp": _stats([c["ref_logp"] for c in comps if c["ref_logp"] is not None]),
    }


def format_summary(label: str, s: dict) -> str:
    """One line for the log: `label: counts; reward statistics; reference sets; ref_logp`."""
    line = f"{label}: {s['prompts']} prompts, {s['rows']} rows, {s['completions']} completions"
    r = s["reward"]
    if r["count"]:
        line += (
            f"; reward mean {r['mean']:.4g} std {r['std']:.3g} "
            f"[{r['min']:.4g}, {r['max']:.4g}] over {r['count']}"
        )
    k = s["ref_rewards_per_prompt"]
    if k["count"] and k["max"]:
        line += f"; {k['mean']:.3g} reference rewards per prompt, {s['tied_prompts']} all tied"
    if s["ref_logp"]["count"]:
        line += f"; ref_logp mean {s['ref_logp']['mean']:.4g}"
    return line


# --------------------------------------------------------------------------- running a shard


def assign(units: list[list[dict]], shard: int, num_shards: int) -> list[list[dict]]:
    """The units (a prompt's rows) of one shard: every num_shards-th, by order of appearance."""
    return [u for p, u in enumerate(units) if p % num_shards == shard]


def run_shard(
    step: str,
    root: Path,
    shard: int,
    num_shards: int,
    units: Callable[[], list[list[dict]]],
    chunk_size: int,
    config: dict,
    make_worker: Callable[[], Worker],
    log: Callable[[str], None] = print,
    resolved_config: str = "",
    overwrite: bool = False,
) -> dict:
    """Run one shard of a step: plan, process missing chunks, then the manifest; returns it.

    `units` reads this shard's input and `make_worker` loads models, only when there are chunks
    to make. Output already there (finished or not) is reused only when its saved config and
    input fingerprint are this run's; otherwise ShardError names the changed keys, or, with
    `overwrite`, the shard's files are deleted and it is made again. The shard folder is locked
    for the run (qrpo.common.run_lock): array tasks write other shards of the same step at once,
    legitimately; two processes on one shard would mix their chunks. `resolved_config` (YAML)
    is saved as config.yaml with the plan, to repeat the run that started the shard.
    """
    folder = Path(root) / step / shard_name(shard, num_shards)
    t0 = time.perf_counter()
    mine = units()  # read before anything is written: a missing input leaves no shard folder
    chunks = [mine[i : i + chunk_size] for i in range(0, len(mine), chunk_size)]
    plan = {
        "step": step,
        "shard": shard,
        "num_shards": num_shards,
        "chunk_size": chunk_size,
        "config": config,
        "input": input_fingerprint(mine),
        "chunks": [[u[0]["prompt_id"] for u in chunk] for chunk in chunks],
    }
    plan = json.loads(json.dumps(plan))  # as it reads back from plan.json (tuples as lists)
    with hold(folder, "out"):
        manifest = _reuse_or_plan(folder, plan, overwrite, log, resolved_config)
        if manifest is not None:
            return manifest
        return _run_chunks(folder, plan, chunks, mine, make_worker, log, t0)


def _reuse_or_plan(
    folder: Path, plan: dict, overwrite: bool, log, resolved_config: str
) -> dict | None:
    """The finished shard's manifest when it can be reused as it is; else None, with the plan
    written (or an unfinished shard's plan checked, to resume it)."""
    manifest_path, plan_path = folder / "manifest.json", folder / "plan.json"
    finished = manifest_path.is_file()
    if finished:
        saved, keys = json.loads(manifest_path.read_text()), ("config", "input")
    elif plan_path.is_file():
        saved, keys = json.loads(plan_path.read_text()), ("config", "input", "chunk_size", "chunks")
    else:
        saved, keys = None, ()
    changed = changed_keys(saved, plan, keys) if saved is not None else []
    if changed and not overwrite:
        raise ShardError(
            f"{folder} was {'made' if finished else 'started'} with another config: "
            f"{', '.join(changed)}. Pass overwrite=true to delete and regenerate it, or use "
            "another out= folder"
        )
    if changed:
        log(f"{plan['step']} {folder.name}: overwrite=true, regenerating ({', '.join(changed)})")
        for p in folder.iterdir():
            if p.is_file() and p.name != LOCK_NAME:
                p.unlink()
        saved = None
    elif finished:
        log(f"{plan['step']} {folder.name}: already finished ({manifest_path}), nothing to do")
        return saved
    if saved is None:
        if resolved_config:
            write_text_atomic(folder / "config.yaml", resolved_config)
        write_text_atomic(plan_path, json.dumps(plan, indent=1))
    return None


def _run_chunks(folder: Path, plan: dict, chunks, mine, make_worker, log, t0: float) -> dict:
    """Make the chunks that are missing, then the manifest from all the chunk files."""
    from tqdm import tqdm

    step, shard, num_shards = plan["step"], plan["shard"], plan["num_shards"]
    todo = [k for k in range(len(chunks)) if not (folder / chunk_name(k)).is_file()]
    for k in sorted(set(range(len(chunks))) - set(todo)):
        log(f"{step} {folder.name}: {chunk_name(k)} already done, skipped")
    if todo:
        worker = make_worker()
        bar = tqdm(
            total=len(mine),
            initial=len(mine) - sum(len(chunks[k]) for k in todo),
            unit="prompt",
            desc=f"{step} {shard}/{num_shards}",
        )
        tokens, busy = 0, 0.0
        for k in todo:
            rows = [row for unit in chunks[k] for row in unit]
            t = time.perf_counter()
            out, n = worker(rows)
            busy += time.perf_counter() - t
            tokens += n
            write_rows_parquet(out, folder / chunk_name(k))
            bar.update(len(chunks[k]))
            if tokens:
                bar.set_postfix(tok_s=f"{tokens / max(busy, 1e-9):.0f}")
        bar.close()

    # The summary comes from the chunk files, so it covers chunks written by a killed run too.
    entries, all_rows = [], []
    for k, ids in enumerate(plan["chunks"]):
        rows = read_rows_parquet(folder / chunk_name(k))
        present = {r["prompt_id"] for r in rows}
        entries.append(
            {
                "file": chunk_name(k),
                "prompt_ids": ids,
                "dropped": [p for p in ids if p not in present],
                "rows": len(rows),
                "completions": sum(len(r["completions"]) for r in rows),
            }
        )
        all_rows += rows
    summary = row_stats(all_rows)
    manifest = {
        **{k: plan[k] for k in ("step", "shard", "num_shards", "chunk_size", "config", "input")},
        "chunks": entries,
        "summary": summary,
        "seconds": time.perf_counter() - t0,
    }
    write_text_atomic(folder / "manifest.json", json.dumps(manifest, indent=1))
    for stale in folder.glob("*.tmp-*"):  # temporaries of a killed run
        stale.unlink(missing_ok=True)
    log(format_summary(f"{step} {folder.name}", summary))
    return manifest


# --------------------------------------------------------------------------- reading shards back


@dataclass
class Collected:
    """A step's rows read back from its shards, with every problem found on the way."""

    rows: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    num_shards: int = 0
    summaries: dict[int, dict] = field(default_factory=dict)


def shard_counts(step_dir: Path) -> set[int]:
    if not step_dir.is_dir():
        return set()
    return {
        int(m.group(2)) for p in step_dir.iterdir() if p.is_dir() and (m := SHARD_RE.match(p.name))
    }


def collect(step_dir: Path, num_shards: int = 0, only: int | None = None) -> Collected:
    """Read a step's shards (or shard `only`), checking them against their plans and manifests.

    Problems: a missing shard folder, an unfinished shard, a missing chunk, a chunk file that no
    plan lists, rows of a prompt in two chunk files, a completion id twice, a chunk whose rows
    disagree with its manifest. Rows of a prompt seen twice are kept once (the first chunk).
    """
    step_dir = Path(step_dir)
    out = Collected()
    counts = shard_counts(step_dir)
    if num_shards <= 0:
        if not counts:
            out.problems.append(f"no shard folders in {step_dir}")
            return out
        if len(counts) > 1:
            out.problems.append(
                f"{step_dir} holds shards of several runs ({sorted(counts)} shards): give "
                "num_shards=N, or remove the stale folders"
            )
            return out
        num_shards = counts.pop()
    out.num_shards = num_shards
    seen_prompts: dict[str, str] = {}
    seen_completions: dict[str, str] = {}
    for s in range(num_shards) if only is None else [only]:
        folder = step_dir / shard_name(s, num_shards)
        plan_path, manifest_path = folder / "plan.json", folder / "manifest.json"
        if not plan_path.is_file():
            out.problems.append(f"missing shard {s}: no {plan_path} (the shard never started)")
            continue
        plan = json.loads(plan_path.read_text())
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
        if manifest is None:
            out.problems.append(f"shard {s} is not finished: no {manifest_path}")
        else:
            out.summaries[s] = manifest["summary"]
        planned = {chunk_name(k) for k in range(len(plan["chunks"]))}
        for p in sorted(folder.iterdir()):
            if CHUNK_RE.match(p.name) and p.name not in planned:
                out.problems.append(f"unexpected chunk {p}: not in {plan_path}")
        for k, ids in enumerate(plan["chunks"]):
            path = folder / chunk_name(k)
            if not path.is_file():
                out.problems.append(f"missing chunk {path} ({len(ids)} prompts)")
                continue
            rows = read_rows_parquet(path)
            expected = set(ids)
            if manifest is not None:
                entry = manifest["chunks"][k]
                expected -= set(entry["dropped"])
                if (len(rows), sum(len(r["completions"]) for r in rows)) != (
                    entry["rows"],
                    entry["completions"],
                ):
                    out.problems.append(
                        f"{path}: {len(rows)} rows and "
                        f"{sum(len(r['completions']) for r in rows)} completions, the manifest "
                        f"says {entry['rows']} and {entry['completions']}"
                    )
            present = {r["prompt_id"] for r in rows}
            for pid in sorted(expected - present):
                out.problems.append(f"missing prompt id '{pid}' in {path}")
            for pid in sorted(present - set(ids)):
                out.problems.append(f"prompt id '{pid}' in {path} is not planned there")
            for pid in sorted(present):
                if pid in seen_prompts:
                    out.problems.append(
                        f"duplicate prompt id '{pid}': in {seen_prompts[pid]} and {path}"
                    )
            keep = [r for r in rows if r["prompt_id"] not in seen_prompts]
            for r in keep:
                for c in r["completions"]:
                    cid = c["completion_id"]
                    if cid in seen_completions:
                        out.problems.append(
                            f"duplicate completion id '{cid}': in {seen_completions[cid]} and {path}"
                        )
                    seen_completions.setdefault(cid, str(path))
            for pid in present:
                seen_prompts.setdefault(pid, str(path))
            out.rows += keep
    # One order whatever the sharding: by source row (a prompt's rows keep their own order).
    out.rows = [row for unit in units_of(out.rows) for row in unit]
    return out
