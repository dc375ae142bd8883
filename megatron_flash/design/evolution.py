"""Aging evolution (Real et al., 2019) over the Nemotron-Flash search space, with a state file that survives kills.

The search (paper: Nemotron-Flash section 2.3):

1. the initial population: ``population`` random architectures of the space, each given the largest hidden size
   whose predicted decode latency (lookup table) meets the target, trained and evaluated;
2. each cycle, ``per_cycle`` children are made, each by sampling ``sample_size`` members of the population, taking
   the one with the lowest validation perplexity and mutating it (operator, ratio, FFN count or blocks of one
   stage); the children are trained in parallel; each joins the population and the oldest member leaves;
3. after ``cycles`` cycles, every evaluated candidate is in the results (CSV, markdown, Pareto plot).

Fitness is the validation perplexity after a short training with the real trainer (megatron_flash.design
.candidates); failed candidates rank last. A proposal identical (pattern and hidden size) to an evaluated one is
re-drawn; if it cannot be avoided its result is reused, not retrained.

State (``search_state.json`` in the work folder) is rewritten atomically (temporary file + rename) whenever a
batch of candidates is proposed, after every candidate that finishes, and after each batch joins the population.
It holds the random generator, so a resumed search proposes exactly what the interrupted one would have; candidates
with a result (in the state or in their folder) are never trained again.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import random
import time
from typing import Callable, Optional

from megatron_flash import patterns
from megatron_flash.design import candidates as cand_lib
from megatron_flash.design.latency import LatencyTable, write_json_atomic
from megatron_flash.design.space import Architecture, SearchSpace, SpaceError, WidthRule

STATE_FORMAT = "megatron_flash.search_state/1"
STATE_FILE = "search_state.json"
# Settings that must not change when a search is resumed (cycles, parallelism and the launcher may).
_FROZEN_OPTIONS = ("population", "sample_size", "per_cycle", "latency_target_ms", "seed")


class SearchError(RuntimeError):
    """A search that cannot start or continue; the message says why and what to do."""


def _rng_to_json(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from_json(data) -> random.Random:
    rng = random.Random()
    rng.setstate((data[0], tuple(data[1]), data[2]))
    return rng


def fitness(record: dict) -> float:
    """Lower is better: validation perplexity, +inf for failed or unfinished candidates."""
    ppl = record.get("valid_ppl")
    return float(ppl) if record.get("status") in ("done", "cached") and ppl is not None and math.isfinite(ppl) \
        else math.inf


class EvolutionSearch:
    """One search in one work folder. :meth:`run` starts it or resumes it."""

    def __init__(self, workdir: str, space: SearchSpace, table: LatencyTable, latency_target_ms: float,
                 trainer_args: list, population: int = 16, sample_size: int = 4, cycles: int = 10,
                 per_cycle: int = 10, seed: int = 0, launcher=None, rule: Optional[WidthRule] = None,
                 progress: Callable[[str], None] = print, allow_option_changes: bool = False):
        if population < 1 or per_cycle < 1 or cycles < 0:
            raise SearchError("population and per_cycle must be >= 1, cycles >= 0")
        if not 1 <= sample_size <= population:
            raise SearchError(f"sample_size {sample_size} must be between 1 and the population {population}")
        outside = [h for h in space.hidden_sizes if not table.covers(h)]
        if outside:
            raise SearchError(f"hidden sizes {outside} are outside the latency table's widths {table.widths}: "
                              f"measure the table at these widths (tools/profile_latency.py table --widths ...)")
        missing = sorted(set(space.mixers + ("F",)) - set(table.ops))
        if missing:
            raise SearchError(f"the latency table has no {', '.join(missing)} operator; measure it with "
                              f"--operators")
        self.workdir, self.space, self.table = os.path.abspath(workdir), space, table
        self.rule = rule or table.rule
        for h in space.hidden_sizes:
            self.rule.check(h)
        self.options = {"population": population, "sample_size": sample_size, "cycles": cycles,
                        "per_cycle": per_cycle, "latency_target_ms": float(latency_target_ms), "seed": seed}
        self.trainer_args = list(trainer_args)
        self.launcher = launcher or cand_lib.LocalLauncher()
        self.progress = progress
        self.allow_option_changes = allow_option_changes
        self.stopped_early = False  # run() stopped at its deadline before the end
        self.state_path = os.path.join(self.workdir, STATE_FILE)
        self.state: dict = {}
        self.rng = random.Random(seed)

    # -- state ---------------------------------------------------------------------------------------------

    def _new_state(self) -> dict:
        now = datetime.datetime.now().isoformat(timespec="seconds")
        return {
            "format": STATE_FORMAT, "created": now, "updated": now, "space": self.space.to_dict(),
            "options": dict(self.options), "width_rule": self.rule.to_dict(), "trainer_args": self.trainer_args,
            "latency_table": {"device": self.table.device, "dtype": self.table.dtype, "widths": self.table.widths,
                              "setting": self.table.setting},
            "next_id": 0, "cycle": 0, "population": [], "candidates": {}, "batch": None, "evaluated": 0,
        }

    def _check_resume(self, old: dict) -> None:
        if old.get("format") != STATE_FORMAT:
            raise SearchError(f"{self.state_path} is not a search state (format {old.get('format')!r})")
        changes = []
        if old["space"] != self.space.to_dict():
            changes.append(f"search space: {old['space']} -> {self.space.to_dict()}")
        for key in _FROZEN_OPTIONS:
            if old["options"].get(key) != self.options[key]:
                changes.append(f"{key}: {old['options'].get(key)} -> {self.options[key]}")
        if old["width_rule"] != self.rule.to_dict():
            changes.append("width rule (preset / latency table)")
        if old["trainer_args"] != self.trainer_args:
            changes.append(f"trainer flags: {old['trainer_args']} -> {self.trainer_args}")
        if changes and not self.allow_option_changes:
            raise SearchError(f"the search in {self.workdir} was started with other settings ("
                              + "; ".join(changes) + "); use a new --workdir, or --allow-option-changes to continue "
                              "anyway")

    def load_or_create(self) -> bool:
        """Load the state file if there is one (True) or start a new state (False)."""
        os.makedirs(self.workdir, exist_ok=True)
        if os.path.exists(self.state_path):
            with open(self.state_path, encoding="utf-8") as f:
                try:
                    old = json.load(f)
                except json.JSONDecodeError as exc:
                    raise SearchError(f"{self.state_path} is not valid JSON ({exc}); it is only ever replaced "
                                      f"atomically, so it was edited or truncated by hand") from None
            self._check_resume(old)
            old.update(options=dict(self.options), space=self.space.to_dict(), width_rule=self.rule.to_dict(),
                       trainer_args=self.trainer_args)  # cycles may grow; the rest only with allow_option_changes
            self.state = old
            self.rng = _rng_from_json(old["rng"])
            return True
        self.state = self._new_state()  # first written when the first batch is proposed
        self.rng = random.Random(self.options["seed"])
        return False

    def save(self) -> None:
        self.state["rng"] = _rng_to_json(self.rng)
        self.state["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
        write_json_atomic(self.state_path, self.state)

    @property
    def candidates(self) -> dict:
        return self.state["candidates"]

    # -- proposals -----------------------------------------------------------------------------------------

    def largest_feasible_hidden(self, arch: Architecture) -> tuple[Optional[int], float]:
        """(largest hidden size meeting the latency target, its predicted ms), or (None, ms at the smallest)."""
        pattern = self.space.pattern(arch)
        target = self.options["latency_target_ms"]
        for hidden in sorted(self.space.hidden_sizes, reverse=True):
            ms = self.table.predict(pattern, hidden)
            if ms <= target:
                return hidden, ms
        return None, ms

    def _seen(self) -> dict:
        return {(c["pattern"], c["hidden"]): cid for cid, c in self.candidates.items()}

    def _propose(self, make: Callable[[], tuple[Architecture, dict]], taken: set, tries: int = 200) -> dict:
        """A new record from ``make()`` (architecture, extra fields), feasible and not yet evaluated if possible."""
        fallback, lowest = None, math.inf
        for _ in range(tries):
            try:
                arch, extra = make()
            except SpaceError:  # e.g. no mutation changes this parent: draw another parent
                continue
            hidden, ms = self.largest_feasible_hidden(arch)
            if hidden is None:
                lowest = min(lowest, ms)
                continue
            pattern = patterns.parse(self.space.pattern(arch))
            record = {"arch": arch.to_dict(), "description": arch.describe(), "pattern": pattern, "hidden": hidden,
                      "latency_ms": ms, **extra}
            if (pattern, hidden) not in taken:
                return record
            fallback = fallback or record
        if fallback is not None:
            return fallback
        raise SearchError(f"no architecture in {tries} tries meets the latency target "
                          f"{self.options['latency_target_ms']} ms (the fastest tried needs {lowest:.3f} ms at hidden "
                          f"size {min(self.space.hidden_sizes)}): raise --latency-target-ms or add smaller widths")

    def _new_id(self) -> str:
        cid = f"c{self.state['next_id']:04d}"
        self.state["next_id"] += 1
        return cid

    def _propose_batch(self) -> Optional[dict]:
        opts, pop = self.options, self.state["population"]
        evaluated_initial = sum(1 for c in self.candidates.values() if c["origin"] == "random")
        if evaluated_initial < opts["population"]:
            kind, count = "init", min(opts["per_cycle"], opts["population"] - evaluated_initial)
        elif self.state["cycle"] < opts["cycles"]:
            kind, count = "cycle", opts["per_cycle"]
        else:
            return None
        taken = set(self._seen())
        ids = []
        for _ in range(count):
            if kind == "init":
                record = self._propose(lambda: (self.space.sample(self.rng), {"origin": "random"}), taken)
            else:
                def child():
                    sample = self.rng.sample(pop, min(opts["sample_size"], len(pop)))
                    parent = min(sample, key=lambda cid: (fitness(self.candidates[cid]), cid))
                    arch, how = self.space.mutate(Architecture.from_dict(self.candidates[parent]["arch"]), self.rng)
                    return arch, {"origin": "mutation", "parent": parent, "mutation": how}
                record = self._propose(child, taken)
            cid = self._new_id()
            record.update(id=cid, status="pending", batch_kind=kind, cycle=self.state["cycle"] + (kind == "cycle"),
                          parameters=self.rule.parameter_count(record["pattern"], record["hidden"]))
            duplicate = self._seen().get((record["pattern"], record["hidden"]))
            if duplicate is not None and self.candidates[duplicate]["status"] in ("done", "failed", "cached"):
                record.update(status="cached", cached_from=duplicate,
                              **{k: self.candidates[duplicate].get(k) for k in ("valid_loss", "valid_ppl")})
            self.candidates[cid] = record
            taken.add((record["pattern"], record["hidden"]))
            ids.append(cid)
        return {"kind": kind, "ids": ids, "slurm_job": None}

    # -- evaluation ----------------------------------------------------------------------------------------

    def _folder(self, cid: str) -> str:
        return os.path.join(self.workdir, "candidates", cid)

    def _evaluate_batch(self, batch: dict) -> None:
        folders = {}
        for cid in batch["ids"]:
            record = self.candidates[cid]
            if record["status"] == "cached" and not record.get("reported"):
                record["reported"] = True
                self._report_line(record, 0.0)
            if record["status"] != "pending":
                continue
            folder = self._folder(cid)
            if not os.path.exists(os.path.join(folder, "candidate.json")):
                cand_lib.write_candidate(folder, cid, self.rule.megatron_fields(record["pattern"], record["hidden"]),
                                         self.trainer_args, info={"description": record["description"],
                                                                  "latency_ms": record["latency_ms"]})
            folders[cid] = folder
        if not folders:
            return
        started = time.time()

        def on_done(cid: str, result: dict) -> None:
            record = self.candidates[cid]
            if record["status"] != "pending":
                return
            record["status"] = result.get("status", "failed")
            for key in ("valid_loss", "valid_ppl", "train_loss", "iterations", "tokens", "train_seconds", "error"):
                if key in result:
                    record[key] = result[key]
            self.state["evaluated"] += 1
            self.save()
            self._report_line(record, time.time() - started)

        def remember_job(job_id: str) -> None:
            batch["slurm_job"] = job_id
            self.save()

        cand_lib.run_folders(self.launcher, folders, on_done,
                             manifest=os.path.join(self.workdir, "candidates", f"manifest_{batch['ids'][0]}.txt"),
                             job_id=batch.get("slurm_job"), remember_job=remember_job)

    def _report_line(self, record: dict, elapsed: float) -> None:
        best = self.best()
        done = sum(1 for c in self.candidates.values() if c["status"] != "pending")
        where = "initial" if record["batch_kind"] == "init" else f"cycle {record['cycle']}/{self.options['cycles']}"
        if record["status"] == "cached":
            outcome = f"same model as {record['cached_from']}: not trained again"
        elif record["status"] == "done":
            outcome = f"ppl {record['valid_ppl']:.3f}"
        else:
            outcome = f"FAILED ({record.get('error', '?')[:200]})"
        best_text = f"best {best['valid_ppl']:.3f} ({best['id']})" if best else "best -"
        self.progress(f"[search] {record['id']} {where} | {record['pattern']} @ {record['hidden']} | "
                      f"{record['latency_ms']:.3f} ms | {record['parameters'] / 1e6:.2f}M params | {outcome} | "
                      f"{elapsed:.0f} s | {done} evaluated | {best_text}")

    # -- population ----------------------------------------------------------------------------------------

    def _integrate(self, batch: dict) -> None:
        pop = self.state["population"]
        for cid in batch["ids"]:
            pop.append(cid)
            if batch["kind"] == "cycle":
                while len(pop) > self.options["population"]:
                    pop.pop(0)  # aging: the oldest member leaves, whatever its fitness
        if batch["kind"] == "cycle":
            self.state["cycle"] += 1

    def best(self) -> Optional[dict]:
        done = [c for c in self.candidates.values() if math.isfinite(fitness(c))]
        return min(done, key=lambda c: (fitness(c), c["id"])) if done else None

    def run(self, deadline: Optional[float] = None) -> dict:
        """Run (or resume) to the end; returns the best candidate's record (None if none succeeded).

        ``deadline`` (a time.time()): no batch of candidates starts later; the search then stops with its state
        saved and ``stopped_early`` set, and a rerun resumes it. Candidates already training finish first.
        """
        self.stopped_early = False
        resumed = self.load_or_create()
        if resumed:
            finished = sum(1 for c in self.candidates.values() if c["status"] != "pending")
            self.progress(f"[search] resuming {self.workdir}: {finished} candidates evaluated, cycle "
                          f"{self.state['cycle']}/{self.options['cycles']}")
        else:
            self.progress(f"[search] new search in {self.workdir}: population {self.options['population']}, sample "
                          f"{self.options['sample_size']}, {self.options['cycles']} cycles x "
                          f"{self.options['per_cycle']} candidates, latency target "
                          f"{self.options['latency_target_ms']} ms ({self.table.device})")
        while True:
            if self.state["batch"] is None:
                batch = self._propose_batch()
                if batch is None:
                    break
                self.state["batch"] = batch
                self.save()
            if deadline is not None and time.time() >= deadline:  # the proposed batch waits in the state
                self.stopped_early = True
                self.progress(f"[search] time budget spent: stopping with {self.state['evaluated']} candidates "
                              f"evaluated, cycle {self.state['cycle']}/{self.options['cycles']}; rerun the same "
                              f"command to resume")
                break
            batch = self.state["batch"]
            self._evaluate_batch(batch)
            unfinished = [cid for cid in batch["ids"] if self.candidates[cid]["status"] == "pending"]
            if unfinished:
                raise SearchError(f"candidates {unfinished} finished without a result")
            self._integrate(batch)
            self.state["batch"] = None
            self.save()
            write_reports(self.workdir, list(self.candidates.values()), self.options["latency_target_ms"])
        write_reports(self.workdir, list(self.candidates.values()), self.options["latency_target_ms"])
        best = self.best()
        if best:
            self.progress(f"[search] {'stopped' if self.stopped_early else 'done'}: best {best['id']} "
                          f"{best['pattern']} @ {best['hidden']} | {best['latency_ms']:.3f} ms | ppl "
                          f"{best['valid_ppl']:.3f}; results in "
                          f"{os.path.join(self.workdir, 'results.md')}")
        return best


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------

RESULT_COLUMNS = ("id", "status", "origin", "parent", "cycle", "pattern", "hidden", "parameters", "latency_ms",
                  "valid_loss", "valid_ppl", "train_seconds", "description", "mutation", "cached_from", "error")


def pareto_front(records: list) -> list:
    """Records not dominated in (latency, perplexity): no other is at least as fast and strictly better, or
    faster and at least as good. Sorted by latency."""
    good = sorted((r for r in records if math.isfinite(fitness(r))), key=lambda r: (r["latency_ms"], fitness(r)))
    front, best = [], math.inf
    for r in good:
        if fitness(r) < best:
            front.append(r)
            best = fitness(r)
    return front


def write_reports(workdir: str, records: list, latency_target_ms: Optional[float] = None) -> dict:
    """results.csv (every candidate), results.md (sorted by perplexity, Pareto members marked), pareto.png."""
    records = sorted(records, key=lambda r: (fitness(r), r["id"]))
    front_ids = {r["id"] for r in pareto_front(records)}
    paths = {"csv": os.path.join(workdir, "results.csv"), "md": os.path.join(workdir, "results.md"),
             "png": os.path.join(workdir, "pareto.png")}
    tmp = paths["csv"] + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS + ("pareto",), extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow({**{k: r.get(k, "") for k in RESULT_COLUMNS}, "pareto": int(r["id"] in front_ids)})
    os.replace(tmp, paths["csv"])

    lines = ["| rank | id | pattern | hidden | params (M) | latency (ms) | val loss | val ppl | Pareto | origin |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | :---: | --- |"]
    for rank, r in enumerate(records, 1):
        loss = f"{r['valid_loss']:.4f}" if r.get("valid_loss") is not None else r["status"]
        ppl = f"{r['valid_ppl']:.3f}" if r.get("valid_ppl") is not None else "-"
        origin = r["origin"] + (f" of {r['parent']}" if r.get("parent") else "")
        lines.append(f"| {rank} | {r['id']} | `{r['pattern']}` | {r['hidden']} | {r['parameters'] / 1e6:.2f} | "
                     f"{r['latency_ms']:.3f} | {loss} | {ppl} | {'*' if r['id'] in front_ids else ''} | {origin} |")
    header = "# Architecture search results\n\n"
    if latency_target_ms is not None:
        header += f"Latency target: {latency_target_ms} ms per decode step (lookup-table prediction).\n\n"
    footer = ""
    trained = [r for r in records if r.get("status") == "done" and math.isfinite(fitness(r))]  # not "cached"
    if trained:
        best = os.path.join(workdir, "candidates", trained[0]["id"], "candidate.json")
        footer = (f"\nTo pretrain the best one: `python -m megatron_flash.pretrain --preset-file {best} ...` "
                  f"(or `MF_PRESET_FILE={best}` with a launch/ script).\n")
    with open(paths["md"] + ".tmp", "w", encoding="utf-8") as f:
        f.write(header + "\n".join(lines) + "\n" + footer)
    os.replace(paths["md"] + ".tmp", paths["md"])
    plot_pareto(records, paths["png"], latency_target_ms)
    return paths


def plot_pareto(records: list, path: str, latency_target_ms: Optional[float] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in records if math.isfinite(fitness(r))]
    front = pareto_front(good)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if good:
        ax.scatter([r["latency_ms"] for r in good], [fitness(r) for r in good], s=18, alpha=0.6, label="candidates")
        ax.plot([r["latency_ms"] for r in front], [fitness(r) for r in front], "o-", color="C3", label="Pareto front")
        best = min(good, key=fitness)
        ax.annotate(best["id"], (best["latency_ms"], fitness(best)), textcoords="offset points", xytext=(4, 4))
    if latency_target_ms is not None:
        ax.axvline(latency_target_ms, color="gray", linestyle="--", label="latency target")
    ax.set_xlabel("predicted decode latency (ms / token)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"{len(good)} candidates")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


# --------------------------------------------------------------------------------------------------------------
# Rank correlation (the proxy check: do short-training rankings agree with longer ones?)
# --------------------------------------------------------------------------------------------------------------


def rankdata(values) -> list:
    """Ranks 1..n, ties getting the average of the ranks they span (scipy.stats.rankdata's default)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman's rank correlation: Pearson's correlation of the (average-tie) ranks."""
    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} values against {len(b)}")
    if len(a) < 2:
        raise ValueError("spearman needs at least two architectures")
    ra, rb = rankdata(list(a)), rankdata(list(b))
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return float("nan")
    return cov / math.sqrt(va * vb)
