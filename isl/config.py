"""Every knob of inference-specific learning, in one typed config whose defaults work on the shared
hippocampus set (see docs/method.md for what each does and why it is set so). It validates on construction
and on assignment, so that no caller (the CLI, the API, a script) can hand the engine a value it refuses."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from registration.affine import AffineConfig
from registration.instance import InstanceConfig


class ISLConfig(BaseModel):
    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    method: Literal["isl", "tta_flip", "baseline"] = Field(
        "isl", description="what refinement returns: ISL, or the network's own flip-averaged (tta_flip) or plain "
                           "(baseline) mask, where `isl train`'s configuration found that no ISL setting beat them")

    atlases: int = Field(14, ge=1, description="K: deformed training cases per scan")
    affine: AffineConfig = Field(default_factory=AffineConfig, description="a global transform per atlas before "
                                 "the deformable registration, fitted to the scan's starting mask")
    # mask-weakly-supervised registration of the atlases toward the scan
    registration: InstanceConfig = Field(default_factory=InstanceConfig)
    mask_flips: bool = Field(True, description="start the scan's mask (weak supervision, EMA) from the baseline "
                                               "averaged over 8 mirror flips")
    reregister_steps: int = Field(10, ge=0, description="instance-optimisation steps of each feedback re-registration")
    reregister_every: int = Field(20, ge=1, description="fine-tuning steps between re-registrations with the EMA mask")
    # per-case fine-tuning
    finetune_steps: int = Field(40, ge=0, description="upper bound on fine-tuning steps")
    min_steps: int = Field(15, ge=0, description="fine-tuning steps before the stopping rule may stop")
    finetune_lr: float = Field(3e-4, gt=0)
    finetune_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="the fine-tuning learning rate: held, or annealed to zero over finetune_steps (a "
                                "converged network is moved least at the end, where the last steps land)")
    finetune_params: Literal["all", "decoder", "norm"] = Field(
        "all", description="what fine-tuning moves: every weight, the expanding path only (the encoder frozen), or "
                           "the normalisation layers' affine parameters only")
    finetune_batch: int = Field(2, ge=1)
    finetune_interpolation: float = Field(
        1.0, ge=0, le=1, description="the tuned copy's weights blended with the network's: a x tuned + (1 - a) x "
                                     "network (weight-space ensembling, as WiSE-FT); 1: the tuned copy as it is")
    augment_strength: float = Field(0.5, ge=0, description="scales the training augmentation's probabilities")
    scan_weight: float = Field(0.0, ge=0, description="weight of the scan itself in fine-tuning, on its confident "
                                                      "pseudo-label (0: off)")
    pseudo_confidence: float = Field(0.9, gt=0, le=1, description="probability above which a scan voxel's "
                                                                  "pseudo-label is trusted")
    # moving average of the predictions and the stopping rule
    predict_every: int = Field(5, ge=1)
    ema_decay: float = Field(0.7, ge=0, lt=1, description="EMA <- decay * EMA + (1 - decay) * prediction")
    stop_tolerance: float = Field(0.005, ge=0, description="stop when 1 - Dice(EMA mask, previous EMA mask) stays "
                                                           "below")
    stop_patience: int = Field(2, ge=1)
    # the final mask
    final_flips: bool = Field(True, description="average the tuned network over 8 mirror flips for the final "
                                                "prediction")
    final_inference: Literal["scan", "roi"] = Field(
        "scan", description="where the tuned network's final prediction is inferred: sliding windows over the whole "
                            "scan, as the baseline is (so an untuned network returns the starting mask), or one pass "
                            "over the region of interest it was fine-tuned on; `isl train`'s configuration decides")
    fusion_weight: float = Field(0.8, ge=0, le=1, description="weight of the fused warped atlas labels in the final "
                                                              "mask")
    min_agreement: float = Field(0.5, ge=0, le=1, description="per-case safety: a label's fusion (or tuned "
                                 "network) counts in the final mask only where its Dice with the starting mask is "
                                 "at least this; otherwise the starting mask stands for that label (0: off)")
    label_fusion_weights: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict, description="per-label fusion weight (label name -> weight) where it differs from "
                                          "fusion_weight: each organ is drawn by the mix made with its own weight")
    keep_start: list[str] = Field(default_factory=list, description="labels (by name) that refinement leaves as the "
                                  "starting mask: those on which `isl train`'s configuration found that ISL did not "
                                  "raise the validation Dice")
    fusion_beta: float = Field(30.0, ge=0, description="sharpness of the per-voxel atlas weights softmax(beta * local "
                                                       "NCC); 0: plain mean")
    fusion_window: int = Field(5, ge=3, description="window (voxels) of the local NCC that weighs atlases in fusion")
    fusion_search: int = Field(1, ge=0, le=3, description="search radius (voxels) of non-local fusion: each atlas "
                                                          "also votes from its neighbouring voxels")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    # experiments (benchmarks/README.md): each default is the method; a config dump leaves a field out while it
    # holds its default, so that configurations, reports and bundle versions written before these fields read the
    # same
    atlas_alignment: Literal["registered", "undeformed"] = Field(
        "registered", description="the atlases that fine-tuning learns from and the final mask fuses: registered "
                                  "toward the scan (the method), or undeformed (zero displacement: the network's own "
                                  "training crops; a control, benchmarks/finetune_control.py); registration still "
                                  "selects the K atlases and its QA (folding, atlas vote) stays that of the "
                                  "registered ones")
    full_resolution_steps: int = Field(
        0, ge=0, description="instance-optimisation steps added after every alignment on the full-resolution grid "
                             "(the registration's `downsample` set to 1), from the aligned displacements, with the "
                             "registration's weights and full_resolution_lr (0: none, the method; a better teacher, "
                             "benchmarks/finetune_teacher.py)")
    full_resolution_lr: float = Field(0.1, gt=0, description="Adam learning rate of the full_resolution_steps")
    finetune_optimizer: Literal["adam", "sgd"] = Field(
        "adam", description="the optimiser of per-case fine-tuning at finetune_lr: Adam (the method), or SGD with "
                            "momentum 0.9 (a gentler recipe, benchmarks/finetune_teacher.py)")

    @model_validator(mode="before")
    @classmethod
    def _one_alignment(cls, data: Any) -> Any:
        """Undeformed atlases have no registration to refine. Before the fields (on assignment too, where `data`
        holds every field with the new value): a refused assignment leaves the config as it was."""
        if isinstance(data, dict) and data.get("atlas_alignment") == "undeformed" and data.get("full_resolution_steps"):
            raise ValueError(f"full_resolution_steps ({data['full_resolution_steps']}) refine a registration, and "
                             f"atlas_alignment 'undeformed' has none: set full_resolution_steps to 0 or "
                             f"atlas_alignment to 'registered'")
        return data

    @model_serializer(mode="wrap")
    def _experiments_only_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The dump, less the EXPERIMENTS fields that hold their defaults (reading it back gives them again)."""
        data = handler(self)
        for name in EXPERIMENTS:
            if name in data and getattr(self, name) == type(self).model_fields[name].get_default(
                    call_default_factory=True):
                del data[name]
        return data


EXPERIMENTS = ("affine", "atlas_alignment", "full_resolution_steps", "full_resolution_lr", "finetune_optimizer")
