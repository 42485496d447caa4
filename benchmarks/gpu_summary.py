"""Summarises the files that benchmarks/gpu_session.sh wrote on a GPU machine into one JSON: the jobs run end to end
through `isl worker --device cuda`, ISL's seconds per stage and per case (median over the cases after the first,
which pays CUDA's start-up; and the first alone), the peak GPU memory, and the training times of
`isl train --device cuda`; with the same cases' CPU figures from the committed evaluation beside them (Dice must agree
closely, the times are the point).

    python -m benchmarks.gpu_summary SESSION_FOLDER --json benchmarks/results/gpu_h200.json
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import tarfile
from pathlib import Path

from benchmarks.common import add_options, emit, stamped


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _median(values):
    return round(statistics.median(values), 3) if values else None


def _mean_dice(row: dict, method: str) -> float:
    scores = row[f"dice_{method}"]
    return round(sum(scores.values()) / len(scores), 4) if scores else float("nan")


def training_progress(folder: Path) -> dict | None:
    """Seconds per iteration of each network from the session's time-stamped train log (in logs.tar.gz): what
    training reached even where the session's time ran out before it ended."""
    logs = folder / "logs.tar.gz"
    if not logs.is_file():
        return None
    with tarfile.open(logs) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("train.log")), None)
        text = tar.extractfile(member).read().decode() if member else ""
    marks: dict[str, list[tuple[int, int, int]]] = {}
    for t, net, it, total in re.findall(r"\[(\d+) s\] (segmentation|registration) iteration (\d+)/(\d+)", text):
        marks.setdefault(net, []).append((int(t), int(it), int(total)))
    out = {}
    for net, rows in marks.items():
        (t0, i0, total), (t1, i1, _) = rows[0], rows[-1]
        per_it = (t1 - t0) / (i1 - i0) if i1 > i0 else None
        out[net] = {"iterations_reached": i1, "of": total,
                    "seconds_per_iteration": round(per_it, 4) if per_it else None,
                    "seconds_for_all_iterations_at_that_rate": round(per_it * total, 1) if per_it else None}
    # one line per network trained (an ensemble trains several): their seconds add up
    loaders = re.findall(r"trained \d+ iterations in (\d+) s, (\d+) s of it waiting for batches "
                         r"\((\d+ (?:threads|worker processes))", text)
    if loaders and "segmentation" in out:
        out["segmentation"] |= {"seconds": sum(int(t) for t, _, _ in loaders),
                                "seconds_waiting_for_batches": sum(int(w) for _, w, _ in loaders),
                                "batches_prepared_by": loaders[0][2], "networks": len(loaders)}
    return out


def _jobs(jobs: dict) -> dict:
    """The jobs run end to end through `isl worker --device cuda` (worker_job's JSON)."""
    return {"command": jobs["command"], "stack_start_seconds": jobs.get("stack_start_seconds"),
            "jobs": [{k: r.get(k) for k in ("case", "model", "state", "worker_device", "method",
                                            "submit_to_done_seconds", "mean_dice", "stage_seconds")}
                     for r in jobs["cases"]]}


def _isl_on_gpu(ev: dict, cpu: dict) -> dict:
    """ISL's seconds per stage and per case on the GPU (`isl evaluate --device cuda`), beside each case's CPU Dice
    and seconds from the committed evaluation (`cpu`: case -> its row)."""
    rows = ev["cases"]
    stages = sorted({k for r in rows for k in r["stage_seconds"]})
    warm = rows[1:] or rows
    methods = ("baseline", "isl", "fusion_only", "network_only")
    return {
        "command": ev.get("command"), "device": ev.get("device"), "cases": [r["case"] for r in rows],
        "median_seconds_isl_full_run_after_first": _median([r["seconds_isl_full_run"] for r in warm]),
        "seconds_isl_full_run_first_case": rows[0]["seconds_isl_full_run"],
        "median_stage_seconds_after_first": {s: _median([r["stage_seconds"].get(s, 0.0) for r in warm])
                                             for s in stages},
        "median_seconds_after_first": {m: _median([r[f"seconds_{m}"] for r in warm])
                                       for m in ("isl", "tta_flip", "tent")},
        "per_case": [{"case": r["case"], "seconds_isl_full_run": r["seconds_isl_full_run"],
                      "stage_seconds": r["stage_seconds"],
                      "mean_dice_gpu": {m: _mean_dice(r, m) for m in methods},
                      "mean_dice_cpu": ({m: _mean_dice(cpu[r["case"]], m) for m in methods}
                                        if r["case"] in cpu else None),
                      "seconds_isl_full_run_cpu": cpu[r["case"]]["seconds_isl_full_run"]
                      if r["case"] in cpu else None} for r in rows]}


def _training(bundle: dict | None):
    """What `isl train --device cuda` recorded in the bundle's metadata, when training ended."""
    if not bundle:
        return "did not finish within the session"
    return {"command": bundle.get("command"),
            "training": {k: v for k, v in bundle.get("training", {}).items() if k != "curves"},
            "train_cases": len(bundle.get("train_cases", [])),
            "validation_cases": len(bundle.get("validation_cases", [])),
            "configuration": (bundle.get("refinement") or {}).get("decision")}


def _gpu_trained(trained: dict, cpu: dict) -> dict:
    """The GPU-trained bundle on the test cases, per case and on average, beside the committed CPU bundle."""
    methods = ("baseline", "isl", "tta_flip", "fusion_only", "network_only")
    out = {"command": trained.get("command"), "config_used": trained["summary"].get("config_used"),
           "per_case": [{"case": r["case"], "mean_dice_gpu_trained": {m: _mean_dice(r, m) for m in methods},
                         "mean_dice_committed_cpu_bundle": ({m: _mean_dice(cpu[r["case"]], m) for m in methods}
                                                            if r["case"] in cpu else None)}
                        for r in trained["cases"]]}
    for key in ("mean_dice_gpu_trained", "mean_dice_committed_cpu_bundle"):
        rows = [r[key] for r in out["per_case"] if r[key]]
        out[key] = {m: round(statistics.mean(r[m] for r in rows), 4) for m in methods} if rows else None
    return out


def summarise(folder: Path, cpu_evaluation: Path) -> dict:
    out = {"device": (folder / "nvidia_smi.txt").read_text().strip().splitlines()
           if (folder / "nvidia_smi.txt").is_file() else None}
    cpu = {r["case"]: r for r in (_load(cpu_evaluation) or {"cases": []})["cases"]}
    jobs = _load(folder / "worker_job_gpu.json")
    if jobs:
        out["jobs_end_to_end"] = _jobs(jobs)
    ev = _load(folder / "evaluate_gpu.json")
    if ev:
        out["isl_on_gpu"] = _isl_on_gpu(ev, cpu)
        memory = _load(folder / "evaluate_gpu_memory.json")
        if memory:
            out["isl_on_gpu"]["memory"] = memory
    out["training_on_gpu"] = _training(_load(folder / "train_gpu.json"))
    trained = _load(folder / "evaluate_gpu_trained.json")
    if trained:
        out["gpu_trained_bundle_on_test_cases"] = _gpu_trained(trained, cpu)
    out["training_progress_on_gpu"] = training_progress(folder)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="what gpu_session.sh wrote to $OUT")
    ap.add_argument("--cpu-evaluation", type=Path, default=Path("models/headneck_ct/evaluation.json"))
    add_options(ap, json=None)
    args = ap.parse_args()
    emit(stamped(summarise(args.folder, args.cpu_evaluation), machine=False), args.json)


if __name__ == "__main__":
    main()
