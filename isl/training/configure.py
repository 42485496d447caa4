"""Self-configuration of refinement (nnU-Net's principle: decide from the user's data, not from defaults).

After training, `isl train` runs every validation case (training cases that neither network saw and that are not
atlases) through a bounded search over the refinement settings that matter, and keeps the one with the best mean
Dice on them, subject to the rule a hospital needs: no more than a fifth of the cases worse than the network
alone. The network's own masks (plain and flip-averaged) are candidates too; when no ISL setting beats them, the
bundle says so and refinement returns the best of them.

Cost: the starting mask's mirror averaging is decided first, from the network alone (on when flip TTA beats the
plain network on the validation cases: the weak supervision is only as good as that mask). The global stage before
the registration is decided next, from the atlases alone (one registration and fusion per case and kind of
GLOBAL_KINDS; a stage is kept only where the fusion beats the atlases as cropped). K needs a run each; fine-tuning
steps are snapshots of one run (a run stopped at 20 steps is the first 20 steps of a run of 40, the stopping rule
being off in configured bundles); the final mix (weight, fusion sharpness and search, the tuned network's mirror
averaging and where it is inferred, the per-case safety threshold) is recomputed from each snapshot's ingredients.
So a validation case costs 2 ISL runs plus the extra fusions and mixes, about 3x one refinement.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from imaging.dataset import load_case
from imaging.metrics import dice
from isl.align import fuse
from isl.config import ISLConfig
from isl.finetune import finetune
from isl.mask import agreement, initial_mask, predict_roi, safe_mix
from isl.refiner import Refiner
from isl.timer import Timer
from segmentation.preprocess import paste

STEPS = (0, 20, 40)  # fine-tuning steps (0: the untuned network)
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # fusion weight in the final mix
FUSIONS = ((30.0, 1), (0.0, 0))  # (fusion_beta, fusion_search): non-local weighted, plain mean
AGREEMENTS = (0.0, 0.5, 0.7)  # per-case safety threshold (0: off)
INFERENCE = ("scan", "roi")  # the tuned network's final prediction: over the whole scan, or the ROI crop alone
MAX_WORSENED = 0.2  # share of validation cases a setting may make worse than the baseline
GLOBAL_KINDS = ("none", "affine")  # the global stage per atlas before the registration (registration/affine.py)


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
    final_inference: str = "scan"  # last, with a default: scores saved before it was searched still load

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

    def score(self, probs: np.ndarray) -> dict[int, float]:
        return self._dice(probs.argmax(0))

    def _dice(self, pred: np.ndarray) -> dict[int, float]:
        """Dice per label the reference contours (the search keeps labels apart; a case's score is their mean)."""
        return dice(pred, self.truth, self.labels)

    def fusions(self, mask_flips: bool, k: int, cfgs: list[ISLConfig]) -> list[float]:
        """This case's mean Dice of the k warped atlases' fusion alone, aligned and fused as each of `cfgs` says."""
        r = self.refiner
        start = initial_mask(r.net, self.image, r.pre, mask_flips, r.device)
        whole, out = start.start.argmax(0).astype(np.int64), []
        for cfg in cfgs:
            aligner, _ = r.aligner.global_stage(start.scan, start.mask, cfg.affine)
            aligned = aligner.register(start.scan, start.mask, k, cfg.registration)
            fused = fuse(aligned, start.scan, cfg.fusion_beta, cfg.fusion_window, cfg.fusion_search)
            out.append(case_mean(self._dice(paste(whole.copy(), fused.argmax(0), start.center))))
        return out

    def run(self, mask_flips: bool, k: int, base: ISLConfig) -> None:
        r, cfg = self.refiner, base.model_copy(update={"mask_flips": mask_flips, "atlases": k,
                                                      "finetune_steps": max(STEPS), "min_steps": max(STEPS)})
        torch.manual_seed(cfg.seed)
        start = initial_mask(r.net, self.image, r.pre, mask_flips, r.device)
        aligner, _ = r.aligner.global_stage(start.scan, start.mask, cfg.affine)
        aligned = aligner.register(start.scan, start.mask, k, cfg.registration)
        whole = start.start.argmax(0).astype(np.int64)

        def snapshot(steps, network, aligned):
            if steps in STEPS:
                self._mixes(mask_flips, k, steps, network, aligned, start, whole)

        snapshot(0, r.net, aligned)
        finetune(r.net, start, aligned, aligner, cfg, np.random.default_rng(cfg.seed), Timer(),
                 lambda *_: None, snapshot)

    def _fusions(self, aligned, start) -> dict:
        """The fusion variants of one state of the warped atlases (they change only at a re-registration)."""
        if self._fused[0] is not aligned:
            self._fused = (aligned, {f: fuse(aligned, start.scan, f[0], self.refiner.cfg.fusion_window, f[1])
                                     for f in FUSIONS})
        return self._fused[1]

    def _mixes(self, mask_flips, k, steps, network, aligned, start, whole) -> None:
        fused = self._fusions(aligned, start)
        for final_flips, where in itertools.product((False, True) if start.mirror_axes else (False,), INFERENCE):
            net = predict_roi(network, start, final_flips, where)
            agree_net = agreement(net, start.mask)
            for f, fp in fused.items():
                agreements = (agreement(fp, start.mask), agree_net)
                for w, tau in itertools.product(WEIGHTS, AGREEMENTS):
                    roi, _ = safe_mix(start.mask, net, fp, w, tau, agreements)
                    pred = paste(whole.copy(), roi.argmax(0), start.center)
                    key = Setting(mask_flips, k, steps, final_flips, f[0], f[1], w, tau, where)
                    self.scores[key] = self._dice(pred)


def choose_global_stage(searches: list[CaseSearch], mask_flips: bool, k: int, base: ISLConfig,
                        progress=print) -> tuple[ISLConfig, dict]:
    """The global stage, decided from the atlases alone: per kind of GLOBAL_KINDS, the k warped atlases' fusion
    (no fine-tuning) on every validation case; kept only where it beats none. `base` with it, and the record."""
    def staged(kind: str) -> ISLConfig:
        return base.model_copy(update={"affine": base.affine.model_copy(update={"kind": kind})})
    scores = np.array([s.fusions(mask_flips, k, [staged(g) for g in GLOBAL_KINDS]) for s in searches])
    means = {g: round(float(m), 5) for g, m in zip(GLOBAL_KINDS, scores.mean(0))}
    kind = max(GLOBAL_KINDS, key=lambda g: (means[g], g == "none"))  # a tie keeps the atlases as cropped
    progress(f"configuration: global stage {kind} (fusion of {k} warped atlases, mean Dice on {len(searches)} "
             f"validation cases: " + ", ".join(f"{g} {m:.4f}" for g, m in means.items()) + ")")
    return staged(kind), {"kind": kind, "fusion_mean_dice": means, "atlases": k, "cases": len(searches),
                          "rule": "the kind whose warped atlases' fusion scores the highest mean Dice; none on a tie"}


def case_mean(scores: dict[int, float]) -> float:
    """A case's score: the mean Dice over the labels its reference contours."""
    return float(np.mean(list(scores.values())))


def _start_key(setting: Setting) -> str:
    """The peer whose mask an ISL setting starts from (and returns for the labels it leaves alone)."""
    return "tta_flip" if setting.mask_flips else "baseline"


def composite(case: dict, choice: Choice) -> float:
    """One case's mean Dice under `choice`, label by label from the search's scores: a refined label scores what
    the mix with its own weight scored, a kept label what the starting mask scored."""
    start = case[_start_key(choice.setting)]
    return float(np.mean([start[v] if v in choice.keep else case[choice.member(v)][v] for v in start]))


def _worsened(scores, baseline) -> int:
    return int(np.sum(np.asarray(scores) - np.asarray(baseline) < -1e-6))


@dataclass(frozen=True)
class Choice:
    """An ISL setting with, per label, its fusion weight or whether it is left as the starting mask; and its score
    per validation case."""

    setting: Setting  # its fusion_weight: the weight of the labels not listed in `weights`
    weights: tuple[tuple[int, float], ...] = ()  # (label, fusion weight) of the refined labels
    keep: frozenset[int] = frozenset()
    scores: tuple[float, ...] = ()
    worsened: int = 0

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores))

    def member(self, label: int) -> Setting:
        """The search's setting whose mix draws `label` under this choice."""
        return replace(self.setting, fusion_weight=dict(self.weights).get(label, self.setting.fusion_weight))


def _choose(cases: list[dict], members: dict[float, Setting], baseline: list[float], allowed: int) -> Choice:
    """For one setting and each fusion weight (`members`): per label, the weight that raises its mean Dice most over
    the cases that contour it, and the label refined only if that gain is positive; then, while more than
    `allowed` cases end worse than the baseline, the label with the smallest gain is left alone too."""
    first = next(iter(members.values()))
    start = _start_key(first)
    best_w, gain = {}, {}
    for v in sorted({v for c in cases for v in c[start]}):
        contoured = [c for c in cases if v in c[start]]
        g = {w: float(np.mean([c[m][v] - c[start][v] for c in contoured])) for w, m in members.items()}
        best_w[v] = max(g, key=g.get)
        gain[v] = g[best_w[v]]
    keep = {v for v, g in gain.items() if g <= 0}
    refined = sorted(set(gain) - keep, key=gain.get)
    while True:
        ws = [best_w[v] for v in refined]
        default = max(set(ws), key=ws.count) if ws else first.fusion_weight
        choice = Choice(replace(first, fusion_weight=default), tuple((v, best_w[v]) for v in refined),
                        frozenset(keep))
        scores = [composite(c, choice) for c in cases]
        choice = replace(choice, scores=tuple(scores), worsened=_worsened(scores, baseline))
        if choice.worsened <= allowed or not refined:
            return choice
        keep.add(refined.pop(0))


def _pick(cases: list[dict]) -> tuple[str, Choice, str]:
    """The decision on `cases`: (method, the best ISL choice, the best peer). ISL is picked when its best choice
    that worsens at most MAX_WORSENED of the cases beats the better of the network's own masks."""
    allowed = int(np.floor(MAX_WORSENED * len(cases)))
    baseline = [case_mean(c["baseline"]) for c in cases]
    groups: dict[Setting, dict[float, Setting]] = {}
    for k in cases[0]:
        if isinstance(k, Setting):
            groups.setdefault(replace(k, fusion_weight=0.0), {})[k.fusion_weight] = k
    choices = [_choose(cases, members, baseline, allowed) for members in groups.values()]  # a weight per label
    choices += [_choose(cases, {w: k}, baseline, allowed)  # one weight for all: fewer cases' worth of choosing
                for members in groups.values() for w, k in members.items()]
    feasible = [c for c in choices if c.worsened <= allowed]
    best = max(feasible or choices, key=lambda c: (c.mean, -c.worsened))
    peers = {m: [case_mean(c[m]) for c in cases] for m in ("baseline", "tta_flip")}
    peer = max((m for m in peers if _worsened(peers[m], baseline) <= allowed), key=lambda m: np.mean(peers[m]))
    isl = best.worsened <= allowed and best.mean > np.mean(peers[peer])
    return ("isl" if isl else peer), best, peer


def _table_row(name: str, scores, baseline) -> dict:
    d = np.asarray(scores) - np.asarray(baseline)
    return {"candidate": name, "mean_dice": round(float(np.mean(scores)), 5),
            "improved": int(np.sum(d > 1e-6)), "worsened": int(np.sum(d < -1e-6))}


def decide(per_case: list[dict], names: dict[int, str] | None = None) -> tuple[str, Choice, list[dict], str]:
    """The decision, from every candidate's per-label Dice on the validation cases: (method, the best ISL choice,
    the validation table, the reason in words).

    ISL's best choice (a setting, and per label whether to refine it: `_choose`) must beat the network's own
    masks while worsening at most MAX_WORSENED of the cases, and the whole rule must hold up when it is re-run
    with each case left out in turn and judged on that case (leave-one-case-out): a choice made among many on a
    few cases flatters itself, and only the left-out figure says what it does on a scan it was not picked on."""
    names = names or {}
    n, allowed = len(per_case), int(np.floor(MAX_WORSENED * len(per_case)))
    baseline = [case_mean(c["baseline"]) for c in per_case]
    method, best, peer = _pick(per_case)
    peer_mean = float(np.mean([case_mean(c[peer]) for c in per_case]))
    loo = []
    for i, case in enumerate(per_case):
        m, choice, _ = _pick(per_case[:i] + per_case[i + 1:]) if n > 1 else (method, best, peer)
        loo.append(composite(case, choice) if m == "isl" else case_mean(case[m]))
    loo_row = _table_row("isl, this rule judged on each case left out of the choice", loo, baseline)
    kept = ", ".join(names.get(v, str(v)) for v in sorted(best.keep)) or "none"
    weights = ", ".join(f"{names.get(v, str(v))} {w}" for v, w in best.weights) or "none"
    table = [_table_row(m, [case_mean(c[m]) for c in per_case], baseline) for m in ("baseline", "tta_flip")]
    table += [_table_row("isl (best setting)", best.scores, baseline)
              | {"labels_left_to_the_network": kept, "fusion_weight_per_label": weights}, loo_row]
    uniform = {k: _table_row("", [case_mean(c[k]) for c in per_case], baseline)
               for k in per_case[0] if isinstance(k, Setting)}
    table.append(uniform[best.setting] | {"candidate": f"isl, same setting, every label refined with fusion weight "
                                                       f"{best.setting.fusion_weight}"})
    off = Setting(**(asdict(best.setting) | {"min_agreement": 0.0}))
    table.append(uniform[off] | {"candidate": "isl, same setting, every label refined, per-case safety off"})
    for name, pick in (("isl, best with every label refined and the per-case safety off",
                        lambda k: k.min_agreement == 0.0),
                       ("isl, best with every label refined and the per-case safety on",
                        lambda k: k.min_agreement > 0.0),
                       ("fusion_only (best, weight 1)", lambda k: k.fusion_weight == 1.0),
                       ("network_only (best, weight 0)", lambda k: k.fusion_weight == 0.0)):
        k = max((k for k in uniform if pick(k)), key=lambda k: uniform[k]["mean_dice"])
        table.append(uniform[k] | {"candidate": name, "setting": asdict(k)})
    if method == "isl" and (loo_row["mean_dice"] <= peer_mean or loo_row["worsened"] > allowed):
        method = peer
        reason = (f"ISL's best setting scored {best.mean:.4f} mean Dice on {n} validation cases against "
                  f"{peer_mean:.4f} for {peer}, but the same rule judged on each case left out of the choice scored "
                  f"{loo_row['mean_dice']:.4f} and worsened {loo_row['worsened']} (at most {allowed} allowed): "
                  f"the gain is not one to expect on a new scan; refinement returns {peer}")
    elif method == "isl":
        reason = (f"ISL's best setting scored {best.mean:.4f} mean Dice on {n} validation cases against "
                  f"{peer_mean:.4f} for {peer}, worsening {best.worsened} of them (at most {allowed} allowed), "
                  f"and {loo_row['mean_dice']:.4f} judged on each case left out of the choice; fusion weight per "
                  f"refined label: {weights}; labels left to the network: {kept}")
    else:
        reason = (f"no ISL setting beat {peer} ({peer_mean:.4f} mean Dice on {n} validation cases) while "
                  f"worsening at most {allowed} of them (best ISL: {best.mean:.4f}, {best.worsened} worsened); "
                  f"refinement returns {peer}")
    return method, best, table, reason


def per_label_table(per_case: list[dict], choice: Choice, names: dict[int, str]) -> dict:
    """label name -> cases contouring it, the starting mask's and the chosen mix's mean Dice on them, and the
    label's fusion weight (None: left as the starting mask)."""
    start, out = _start_key(choice.setting), {}
    for v in sorted({v for c in per_case for v in c[start]}):
        rows = [(c[start][v], c[choice.member(v)][v]) for c in per_case if v in c[start]]
        out[names.get(v, str(v))] = {"n": len(rows), "start": round(float(np.mean([r[0] for r in rows])), 5),
                                     "isl": round(float(np.mean([r[1] for r in rows])), 5),
                                     "fusion_weight": None if v in choice.keep else choice.member(v).fusion_weight}
    return out


def save_scores(path, case_ids: list[str], per_case: list[dict]) -> None:
    """Every candidate's Dice per validation case and label (`configuration_scores.json` beside the bundle), so
    that a decision can be re-examined, or re-made by a new rule, without re-running the search."""
    settings = [k for k in per_case[0] if isinstance(k, Setting)]
    cases = [{"case": c, "labels": list(s["baseline"]),
              "baseline": list(s["baseline"].values()), "tta_flip": list(s["tta_flip"].values()),
              "settings": [list(s[k].values()) for k in settings]}
             for c, s in zip(case_ids, per_case)]
    Path(path).write_text(json.dumps({"settings": [asdict(k) for k in settings], "cases": cases}))


def load_scores(path) -> tuple[list[str], list[dict]]:
    """`save_scores`' file back: (case ids, per-case scores keyed as in the search)."""
    data = json.loads(Path(path).read_text())
    settings = [Setting(**k) for k in data["settings"]]
    per_case = []
    for c in data["cases"]:
        labels = [int(v) for v in c["labels"]]
        scores = {m: dict(zip(labels, c[m])) for m in ("baseline", "tta_flip")}
        scores |= {k: dict(zip(labels, v)) for k, v in zip(settings, c["settings"])}
        per_case.append(scores)
    return [c["case"] for c in data["cases"]], per_case


def configure(refiner: Refiner, ds, case_ids: list[str], budget_s: float = 1800.0, progress=print,
              scores_path=None) -> dict:
    """Search the refinement settings on validation cases `case_ids` of dataset `ds` (whole cases, processed in
    order until `budget_s` seconds are spent; at least 2) and return the bundle's `refinement` record: the
    chosen config, the decision and its reason, the validation table and what the search cost. Every
    candidate's per-label scores go to `scores_path` when given."""
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
    tta = np.mean([case_mean(s.scores["tta_flip"]) for s in searches])
    plain = np.mean([case_mean(s.scores["baseline"]) for s in searches])
    mask_flips = bool(tta >= plain)
    progress(f"configuration: starting mask {'flip-averaged' if mask_flips else 'plain'} (flip TTA "
             f"{tta:.4f} vs baseline {plain:.4f} on {len(searches)} validation cases)")
    base, global_record = choose_global_stage(searches, mask_flips, min(ks), base, progress)
    per_case, used = [], []
    for i, (case_id, search) in enumerate(zip(case_ids, searches)):
        if i >= 2 and time.perf_counter() - t0 > budget_s:
            progress(f"configuration: budget of {budget_s:.0f} s spent after {i} validation cases")
            break
        for k in ks:
            search.run(mask_flips, k, base)
        per_case.append(search.scores)
        used.append(case_id)
        progress(f"configuration [{i + 1}/{len(case_ids)}] {case_id}: baseline "
                 f"{case_mean(search.scores['baseline']):.4f} tta {case_mean(search.scores['tta_flip']):.4f} best "
                 f"ISL {max(case_mean(v) for k, v in search.scores.items() if isinstance(k, Setting)):.4f}")
        if scores_path:
            save_scores(scores_path, used, per_case)
    record = decision_record(per_case, used, {int(v): n for v, n in names.items()}, base, progress)
    return record | {"global_alignment": global_record, "seconds": round(time.perf_counter() - t0, 1),
                     "budget_seconds": budget_s}


def decision_record(per_case: list[dict], case_ids: list[str], names: dict[int, str], base: ISLConfig,
                    progress=print) -> dict:
    """The bundle's `refinement` record from the search's scores (without what the search cost)."""
    method, best, table, reason = decide(per_case, names)
    chosen = best.setting.config(base).model_copy(update={
        "method": method, "keep_start": [names[v] for v in sorted(best.keep)],
        "label_fusion_weights": {names[v]: w for v, w in best.weights if w != best.setting.fusion_weight}})
    progress(f"configuration: {reason}")
    settings = [k for k in per_case[0] if isinstance(k, Setting)]
    return {"config": chosen.model_dump(mode="json", exclude={"device"}),
            "decision": {"method": method, "reason": reason}, "validation_cases": case_ids, "table": table,
            "per_label": per_label_table(per_case, best, names),
            "grid": {"mask_flips": "flip TTA vs baseline on the validation cases",
                     "global_alignment": list(GLOBAL_KINDS),
                     "atlases": sorted({k.atlases for k in settings}), "finetune_steps": list(STEPS),
                     "final_flips": sorted({k.final_flips for k in settings}),
                     "fusion_beta_search": [list(f) for f in FUSIONS], "fusion_weight": list(WEIGHTS),
                     "min_agreement": list(AGREEMENTS),
                     "final_inference": [w for w in INFERENCE if any(k.final_inference == w for k in settings)],
                     "max_worsened_share": MAX_WORSENED,
                     "per_label": "each label's fusion weight chosen on its own; a label is refined only where "
                                  "that raised its validation Dice",
                     "leave_one_case_out": True}}
