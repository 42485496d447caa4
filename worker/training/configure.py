"""Self-configuration of refinement (nnU-Net's principle: decide from the user's data, not from defaults).

After training, `isl train` runs every validation case (training cases that neither network saw and that are not
atlases) through a bounded search over the refinement settings that matter, and keeps the one with the best mean
Dice on them, subject to the rule a hospital needs: no more than a fifth of the cases worse than the network
alone. The network's own masks (plain and flip-averaged) are candidates too; when no ISL setting beats them, the
bundle says so and refinement returns the best of them.

Cost: the starting mask's mirror averaging is decided first, from the network alone (on when flip TTA beats
the plain network on the validation cases: the weak supervision is only as good as that mask). K needs a run
each; fine-tuning steps are snapshots of one run (a run stopped at 20 steps is the first 20 steps of a run of
40, the stopping rule being off in configured bundles); the final mix (weight, fusion sharpness and search, the
tuned network's mirror averaging, the per-case safety threshold) is recomputed from each snapshot's ingredients.
So a validation case costs 2 ISL runs plus the extra fusions and mixes, about 3x one refinement.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from segmentation.dataset import load_case
from segmentation.infer import predict_probs
from segmentation.metrics import mean_dice
from segmentation.preprocess import paste
from worker.method.align import fuse
from worker.method.config import ISLConfig
from worker.method.finetune import finetune
from worker.method.mask import agreement, initial_mask, safe_mix
from worker.method.refiner import Refiner
from worker.method.timer import Timer

STEPS = (0, 20, 40)  # fine-tuning steps (0: the untuned network)
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # fusion weight in the final mix
FUSIONS = ((30.0, 1), (0.0, 0))  # (fusion_beta, fusion_search): non-local weighted, plain mean
AGREEMENTS = (0.0, 0.5, 0.7)  # per-case safety threshold (0: off)
MAX_WORSENED = 0.2  # share of validation cases a setting may make worse than the baseline


def atlas_counts(pool: int) -> tuple[int, ...]:
    """K candidates: 8 and 16 atlases, capped at the pool."""
    return tuple(sorted({min(pool, 8), min(pool, 16)}))


@dataclass(frozen=True)
class Setting:
    mask_flips: bool
    atlases: int
    finetune_steps: int
    final_flips: bool
    fusion_beta: float
    fusion_search: int
    fusion_weight: float
    min_agreement: float

    def config(self, base: ISLConfig) -> ISLConfig:
        """`base` with this setting; the stopping rule off (min_steps = finetune_steps), as searched."""
        return base.model_copy(update=asdict(self) | {"min_steps": self.finetune_steps, "method": "isl"})


class CaseSearch:
    """Every candidate's Dice on one validation case."""

    def __init__(self, refiner: Refiner, image: np.ndarray, truth: np.ndarray, labels: list[int]):
        self.refiner, self.image, self.truth, self.labels = refiner, image, truth, labels
        r = refiner
        self.scores: dict = {"baseline": self.score(initial_mask(r.net, image, r.pre, False, r.device).start)}
        self.scores["tta_flip"] = self.score(initial_mask(r.net, image, r.pre, True, r.device).start) \
            if r.pre.mirror_axes else self.scores["baseline"]  # no mirror axis: flip TTA is the baseline
        self._fused: tuple = (None, {})

    def score(self, probs: np.ndarray) -> float:
        return mean_dice(probs.argmax(0), self.truth, self.labels)

    def run(self, mask_flips: bool, k: int, base: ISLConfig) -> None:
        r, cfg = self.refiner, base.model_copy(update={"mask_flips": mask_flips, "atlases": k,
                                                      "finetune_steps": max(STEPS), "min_steps": max(STEPS)})
        torch.manual_seed(cfg.seed)
        start = initial_mask(r.net, self.image, r.pre, mask_flips, r.device)
        aligned = r.aligner.register(start.scan, start.mask, k, cfg.registration)
        whole = start.start.argmax(0).astype(np.int64)

        def snapshot(steps, network, aligned):
            if steps in STEPS:
                self._mixes(mask_flips, k, steps, network, aligned, start, whole)

        snapshot(0, r.net, aligned)
        finetune(r.net, start, aligned, r.aligner, cfg, np.random.default_rng(cfg.seed), Timer(),
                 lambda *_: None, snapshot)

    def _fusions(self, aligned, start) -> dict:
        """The fusion variants of one state of the warped atlases (they change only at a re-registration)."""
        if self._fused[0] is not aligned:
            self._fused = (aligned, {f: fuse(aligned, start.scan, f[0], self.refiner.cfg.fusion_window, f[1])
                                     for f in FUSIONS})
        return self._fused[1]

    def _mixes(self, mask_flips, k, steps, network, aligned, start, whole) -> None:
        fused = self._fusions(aligned, start)
        for final_flips in (False, True) if start.mirror_axes else (False,):
            net = predict_probs(network, start.image, start.mask.shape[1:],
                                flips=start.mirror_axes if final_flips else False)[0].cpu().numpy()
            agree_net = agreement(net, start.mask)
            for f, fp in fused.items():
                agreements = (agreement(fp, start.mask), agree_net)
                for w, tau in itertools.product(WEIGHTS, AGREEMENTS):
                    roi, _ = safe_mix(start.mask, net, fp, w, tau, agreements)
                    pred = paste(whole.copy(), roi.argmax(0), start.center)
                    key = Setting(mask_flips, k, steps, final_flips, f[0], f[1], w, tau)
                    self.scores[key] = mean_dice(pred, self.truth, self.labels)


def _table_row(name: str, scores: list[float], baseline: list[float]) -> dict:
    d = np.asarray(scores) - np.asarray(baseline)
    return {"candidate": name, "mean_dice": round(float(np.mean(scores)), 5),
            "improved": int(np.sum(d > 1e-6)), "worsened": int(np.sum(d < -1e-6))}


def decide(per_case: list[dict]) -> tuple[str, Setting | None, list[dict], str]:
    """The best candidate on the validation cases among those that worsen at most MAX_WORSENED of them:
    (method, the best ISL setting, the validation table, the reason in words)."""
    baseline = [c["baseline"] for c in per_case]
    n, allowed = len(per_case), int(np.floor(MAX_WORSENED * len(per_case)))
    keys = [k for k in per_case[0] if isinstance(k, Setting)]
    scores = {k: [c[k] for c in per_case] for k in keys}
    rows = {k: _table_row("", v, baseline) for k, v in scores.items()}
    feasible = [k for k in keys if rows[k]["worsened"] <= allowed]
    best_isl = max(feasible or keys, key=lambda k: (rows[k]["mean_dice"], -rows[k]["worsened"]))
    peers = {m: _table_row(m, [c[m] for c in per_case], baseline) for m in ("baseline", "tta_flip")}
    peer = max((m for m in peers if peers[m]["worsened"] <= allowed), key=lambda m: peers[m]["mean_dice"])
    isl_row = rows[best_isl] | {"candidate": "isl (best setting)"}
    table = [peers["baseline"], peers["tta_flip"], isl_row]
    off = Setting(**(asdict(best_isl) | {"min_agreement": 0.0}))
    table.append(rows[off] | {"candidate": "isl, same setting, per-case safety off"})
    for name, pick in (("isl, best with the per-case safety off", lambda k: k.min_agreement == 0.0),
                       ("isl, best with the per-case safety on", lambda k: k.min_agreement > 0.0),
                       ("fusion_only (best, weight 1)", lambda k: k.fusion_weight == 1.0),
                       ("network_only (best, weight 0)", lambda k: k.fusion_weight == 0.0)):
        k = max((k for k in keys if pick(k)), key=lambda k: rows[k]["mean_dice"])
        table.append(rows[k] | {"candidate": name, "setting": asdict(k)})
    isl_ok = best_isl in feasible and rows[best_isl]["mean_dice"] > peers[peer]["mean_dice"]
    method = "isl" if isl_ok else peer
    if isl_ok:
        reason = (f"ISL's best setting scored {rows[best_isl]['mean_dice']:.4f} mean Dice on {n} validation cases "
                  f"against {peers[peer]['mean_dice']:.4f} for {peer}, worsening {rows[best_isl]['worsened']} of "
                  f"them (at most {allowed} allowed)")
    else:
        reason = (f"no ISL setting beat {peer} ({peers[peer]['mean_dice']:.4f} mean Dice on {n} validation cases) "
                  f"while worsening at most {allowed} of them (best ISL: {rows[best_isl]['mean_dice']:.4f}, "
                  f"{rows[best_isl]['worsened']} worsened); refinement returns {peer}")
    return method, best_isl, table, reason


def configure(refiner: Refiner, ds, case_ids: list[str], budget_s: float = 1800.0, progress=print) -> dict:
    """Search the refinement settings on validation cases `case_ids` of dataset `ds` (whole cases, processed in
    order until `budget_s` seconds are spent; at least 2) and return the bundle's `refinement` record: the
    chosen config, the decision and its reason, the validation table and what the search cost."""
    t0 = time.perf_counter()
    pre, names = refiner.pre, refiner.bundle.segmentation.labels
    base = refiner.cfg.model_copy(update={"method": "isl"})
    ks = atlas_counts(len(refiner.aligner.ids))
    searches = []
    for case_id in case_ids:  # first the network alone on every case: it decides the starting mask
        case = ds.case(case_id)
        volumes, label, _ = load_case(ds, case)
        labels = [v for v, known in zip(names, case.present(names)) if v != 0 and known]
        searches.append(CaseSearch(refiner, pre.images(volumes)[0], pre.label(label).astype(np.int64), labels))
    mask_flips = bool(np.mean([s.scores["tta_flip"] for s in searches])
                      >= np.mean([s.scores["baseline"] for s in searches]))
    progress(f"configuration: starting mask {'flip-averaged' if mask_flips else 'plain'} (flip TTA "
             f"{np.mean([s.scores['tta_flip'] for s in searches]):.4f} vs baseline "
             f"{np.mean([s.scores['baseline'] for s in searches]):.4f} on {len(searches)} validation cases)")
    per_case, used = [], []
    for i, (case_id, search) in enumerate(zip(case_ids, searches)):
        if i >= 2 and time.perf_counter() - t0 > budget_s:
            progress(f"configuration: budget of {budget_s:.0f} s spent after {i} validation cases")
            break
        for k in ks:
            search.run(mask_flips, k, base)
        per_case.append(search.scores)
        used.append(case_id)
        progress(f"configuration [{i + 1}/{len(case_ids)}] {case_id}: baseline {search.scores['baseline']:.4f} "
                 f"tta {search.scores['tta_flip']:.4f} best ISL "
                 f"{max(v for k, v in search.scores.items() if isinstance(k, Setting)):.4f}")
    method, best, table, reason = decide(per_case)
    chosen = best.config(base).model_copy(update={"method": method})
    progress(f"configuration: {reason}")
    return {"config": chosen.model_dump(mode="json", exclude={"device"}), "decision": {"method": method,
                                                                                     "reason": reason},
            "validation_cases": used, "table": table, "seconds": round(time.perf_counter() - t0, 1),
            "budget_seconds": budget_s,
            "grid": {"mask_flips": "flip TTA vs baseline on the validation cases", "atlases": list(ks),
                     "finetune_steps": list(STEPS),
                     "final_flips": [False, True], "fusion_beta_search": [list(f) for f in FUSIONS],
                     "fusion_weight": list(WEIGHTS), "min_agreement": list(AGREEMENTS),
                     "max_worsened_share": MAX_WORSENED}}
