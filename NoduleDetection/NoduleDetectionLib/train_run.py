"""A training run from a JSON config: data sources, checkpoints, logs, curves and the model card.

``nodule-detection train CONFIG.json -o OUTDIR [--resume]`` runs ``run_training``. The config::

    {
      "seed": 0,
      "init_model": null,                  # or a model file to fine-tune
      "init_stages": ["stage1", "stage2"], # the stages that start from init_model (others start afresh)
      "model": {...},                      # ModelConfig fields (when fine-tuning, only FINE_TUNE_SETTINGS)
      "train": [SOURCE, ...],
      "validation": [SOURCE, ...],
      "stage1": {"steps": 1500, "batch": 4, "lr": 0.003},
      "stage1_refine": {"steps": 0},       # a second stage 1 phase from the first one's result, e.g. at a
                                           # constant learning rate with its weights averaged
      "stage2": {"steps": 600, "batch": 32, "lr": 0.001},  # also "constant_lr": false, "average_from": 0
      "patch1": 48, "validate_every": 250, "patience": 4,
      "time_budget_minutes": 110, "target_fp_per_scan": 0.5,
      "balance_lesions": false,            # stage 1: sample lesions per lesion, weight small ones up
      "tissue_negatives": 150,             # stage 2: negatives per case from the host's dense tissue
      "stage2_rotate": false,              # stage 2: augment with small rotations and scaling too
      "min_target_mm": 0,                  # stage 1: smaller lesions' targets are balls of this diameter
      "min_target_ignores_dense": false,   # stage 1: ... whose dense host voxels (chest wall) are ignored
      "thick_slices": true,                # stage 1: augmentation simulates thicker slices
      "scanner_augmentation": false,       # stage 1: augmentation simulates other scanners (gamma, kernel)
      "small_attached_weight": 1,          # stage 1: draw small attached inserted lesions this many times as often
      "elastic_mm": 0,                     # stage 1: augmentation bends patches (displacement s.d., mm)
      "dot_negative_fraction": 0,          # stage 1: share of non-lesion patches centred on bright compact spots
      "random_convolution": 0,             # stage 1: share of patches given another texture by a random network
      "stage2_random_convolution": 0,      # stage 2: the same
      "stage1_focal_gamma": 0,             # stage 1: focal loss exponent (0: plain cross-entropy)
      "calibration": null                  # or {"lesions": {"path": ..., "scans": [...], "lesions": 200,
                                           #     "per_copy": 25, "seed": 2000}, "blob_candidates": 100, ...}
    }

With a ``calibration`` section the run ends as ``make-lesion-dataset`` and ``calibrate`` would: it inserts the
lesion set (``make_lesion_dataset``'s arguments; a validation set, seed 1000 or more) into
``OUTDIR/calibration_lesions`` and calibrates the trained model on it with the section's other keys
(``calibrate.calibrate``'s options of those names, e.g. ``"candidate_thresholds": [0.05]``, ``"dot_weights"`` for
the shape weights, ``"stage1_spacing_mm"``, ``"stage1_bf16"``; the run's ``target_fp_per_scan``), so that one
``train`` command makes the model that ships.

A ``SOURCE`` is ``{"path": folder, "scans": [names] | null, "slice_mm": null, "insert": null |
{"lesions_per_scan": 20, "copies": 4, "seed": 1, "mix": {...}, "distractors": 0}}`` (a LUNA16 folder, a folder
laid out like ``../shared/data``, a dataset exported from a Slicer scene, or a folder of unannotated scans;
``slice_mm``: reconstruct its scans with slices that thick before anything is inserted,
``augment.thicken_volume``, so a thin-slice host also serves as a thick-slice one), or
``{"phantoms": n, "seed": s}`` for synthetic phantoms (tests and smoke runs only). A key the command does not know,
at the top, in a source or in its ``insert``, is an error naming it: a misspelt setting is never ignored.

Findings of a source are used as follows (and a LUNA16 folder's class-0 candidate points are stage 2
negatives, ``train.mine_candidates``): ``nodule`` rows are positives (a sphere of their diameter is
the stage 1 target); ``excluded`` and ``mass`` rows are ignore regions of radius ``max(d/2, 5 mm)``
(point marks, ``d = -1``, get 5 mm: LIDC's point marks are nodules < 3 mm or non-nodule spots, and 5 mm
covers them with a margin), so they are never positives nor negatives. With ``insert``, each scan is
copied ``copies`` times and ``lesions_per_scan`` synthetic lesions (``lesions``) are inserted into its
lungs, away from every known finding; the inserted masks are the targets. ``mix`` overrides fields of
``lesions.LesionMix`` (default: the LUNA16-like mix), e.g. ``{"median_diameter_mm": 9.0, "log_sigma": 0.7}`` to
give larger lesions more weight in training; ``distractors`` vessel-like tubes per copy are inserted too, with
no label (``lesions.insert_distractors``: negatives imaged like the lesions). Seeds of training insertions
stay below 1000; validation lesion sets use seeds from 1000 (``make-lesion-dataset``), so no validation
lesion shape is ever seen in training.

Outputs in OUTDIR: ``model.safetensors``, ``model_card.md``, ``train_log.jsonl`` (one JSON object per
step: stage, step, steps, loss, val_cpm, elapsed_s), ``training_curves.png``, ``checkpoint.pt`` (resume
state, loaded with ``torch.load(weights_only=True)``), ``config.json`` (the config used); with a ``calibration``
section also ``trained_model.safetensors`` (before calibration), ``calibration_lesions/`` and ``calibration/``
(``calibration.json``, ``calibration.md``), and ``model.safetensors`` is the calibrated model.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .atomic import atomic_path, write_text_atomic
from .augment import thicken_volume
from .calibrate import calibrate, check_options
from .datasets import Dataset
from .detect import resolve_device
from .errors import InputError, NoduleDetectionError
from .io import read_ct
from .lesion_dataset import copy_name, make_lesion_dataset
from .lesions import LesionMix, avoid_radius_mm, insert_distractors, insert_lesions, sample_lesion_specs
from .models import ModelConfig, NoduleModel
from .pipeline import progress_bar
from .preprocess import lung_mask
from .train import (
    PHASES,
    PreparedCase,
    StageSchedule,
    Trainer,
    TrainingCase,
    TrainSettings,
    phantom_cases,
    prepare_case,
)

log = logging.getLogger(__name__)

#: The two networks of a model, as named in ``init_stages``.
STAGES = ("stage1", "stage2")
#: Stage 1 settings of the config's ``model`` section that apply when fine-tuning too (they change what is
#: proposed to stage 2, the grid stage 1 works on or what it sees, not the networks' shapes): e.g. a fine-tuned
#: stage 2 learns to judge blob-filter proposals, a stage 1 that ``calibrate`` set to a finer grid than it learnt
#: on is fine-tuned on its own grid again (``spacing_mm``), and a stage 1 can learn to see the lungs only
#: (``outside_lung_hu``).
FINE_TUNE_SETTINGS = ("blob_candidates", "spacing_mm", "outside_lung_hu")
#: Training insertion seeds must stay below this; validation lesion sets use seeds from it upwards.
VALIDATION_SEED_BASE = 1000
#: The keys a config may have: ``TrainSettings``' fields under their own names (its time budget in minutes), and
#: the model and data sections. Anything else is a typo that would otherwise be ignored without a word.
CONFIG_KEYS = frozenset(TrainSettings.__dataclass_fields__) - {"time_budget_s"} | {
    "time_budget_minutes", "init_model", "init_stages", "model", "train", "validation", "calibration"}
#: The keys of the ``calibration`` section: its lesion set, and the options of ``calibrate.calibrate`` it pins
#: (``fp_per_scan`` is the run's ``target_fp_per_scan``).
CALIBRATION_KEYS = frozenset({"lesions", "candidate_thresholds", "weights", "temperatures", "dot_weights",
                              "blob_candidates", "stage1_spacing_mm", "stage1_bf16", "spare_large"})
#: The keys of the calibration lesion set (``lesion_dataset.make_lesion_dataset``'s arguments).
CALIBRATION_LESION_KEYS = frozenset({"path", "scans", "lesions", "per_copy", "seed"})
#: The keys of a data source and of its ``insert`` entry.
SOURCE_KEYS = frozenset({"path", "scans", "slice_mm", "insert", "phantoms", "seed", "phantom_options"})
INSERT_KEYS = frozenset({"lesions_per_scan", "copies", "seed", "mix", "distractors"})


def _is_number(value: object) -> bool:
    """An int or float from JSON (not a bool, which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_keys(section: dict, known: frozenset[str], where: str) -> None:
    """``InputError`` naming the keys of ``section`` that are not in ``known`` (and the known ones)."""
    unknown = set(section) - known
    if unknown:
        raise InputError(f"{where} has unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")


def load_config(path: str | os.PathLike) -> dict:
    """Read and check a training config (JSON); raise ``InputError`` with a one-line reason."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"training config {path} not found") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"training config {path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or not config.get("train"):
        raise InputError(f"training config {path} has no 'train' data source")
    _check_keys(config, CONFIG_KEYS, f"training config {path}")
    base = path.parent
    for key in ("train", "validation"):
        for source in config.get(key) or []:
            if not isinstance(source, dict) or not isinstance(source.get("insert") or {}, dict):
                raise InputError(f"each {key} data source and its insert must be an object, got {source!r}")
            _check_keys(source, SOURCE_KEYS, f"a {key} data source")
            _check_keys(source.get("insert") or {}, INSERT_KEYS, f"a {key} data source's insert")
            if "path" in source and not Path(source["path"]).is_absolute():
                source["path"] = str((base / source["path"]).resolve())
            ins = source.get("insert") or {}
            if key == "train" and int(ins.get("seed", 0)) >= VALIDATION_SEED_BASE:
                raise InputError(f"training insertion seeds must be below {VALIDATION_SEED_BASE} "
                                 f"(validation lesion sets use {VALIDATION_SEED_BASE} and above)")
            lesion_mix(ins.get("mix") or {})
            slab = source.get("slice_mm")
            if slab is not None and not (_is_number(slab) and 0 < slab <= 10):
                raise InputError(f"slice_mm must be a slice thickness of up to 10 mm, got {slab!r}")
            if not isinstance(ins.get("distractors", 0), int) or ins.get("distractors", 0) < 0:
                raise InputError(f"insert.distractors must be a whole number of tubes per copy, got "
                                 f"{ins['distractors']!r}")
    weight = config.get("small_attached_weight", 1)
    if not (_is_number(weight) and weight > 0):
        raise InputError(f"small_attached_weight must be a number above 0, got {weight!r}")
    elastic = config.get("elastic_mm", 0)
    if not (_is_number(elastic) and 0 <= elastic <= 10):
        raise InputError(f"elastic_mm must be a displacement of 0 to 10 mm, got {elastic!r}")
    dots = config.get("dot_negative_fraction", 0)
    if not (_is_number(dots) and 0 <= dots <= 1):
        raise InputError(f"dot_negative_fraction must be a share from 0 to 1, got {dots!r}")
    gamma = config.get("stage1_focal_gamma", 0)
    if not (_is_number(gamma) and 0 <= gamma <= 5):
        raise InputError(f"stage1_focal_gamma must be a number from 0 to 5, got {gamma!r}")
    for key in ("random_convolution", "stage2_random_convolution"):
        texture = config.get(key, 0)
        if not (_is_number(texture) and 0 <= texture <= 1):
            raise InputError(f"{key} must be a share from 0 to 1, got {texture!r}")
    for stage in PHASES:  # the optimisation schedules, ``StageSchedule`` fields each
        schedule = config.get(stage) or {}
        _check_keys(schedule, frozenset(StageSchedule.__dataclass_fields__), stage)
        start = schedule.get("average_from", 0)
        if not (isinstance(start, int) and not isinstance(start, bool) and start >= 0):
            raise InputError(f"{stage}.average_from must be a step number (0: no weight averaging), got {start!r}")
        if not isinstance(schedule.get("constant_lr", False), bool):
            raise InputError(f"{stage}.constant_lr must be true or false, got {schedule['constant_lr']!r}")
    stages = config.get("init_stages", list(STAGES))
    if not isinstance(stages, list) or not set(stages) <= set(STAGES):
        raise InputError(f"init_stages must be a list of {' and '.join(STAGES)}, got {stages!r}")
    if config.get("init_model") and not Path(config["init_model"]).is_absolute():
        config["init_model"] = str((base / config["init_model"]).resolve())
    if config.get("calibration") is not None:
        _check_calibration(config["calibration"], base, float(config.get("target_fp_per_scan", 0.5)))
    return config


def _check_calibration(section: object, base: Path, fp_per_scan: float) -> None:
    """Check a config's ``calibration`` section (its lesion set's path made absolute from ``base``)."""
    if not isinstance(section, dict) or not isinstance(section.get("lesions"), dict):
        raise InputError('calibration must be an object with a lesion set, {"lesions": {"path": ..., "seed": 2000}}')
    _check_keys(section, CALIBRATION_KEYS, "the calibration section")
    lesions = section["lesions"]
    _check_keys(lesions, CALIBRATION_LESION_KEYS, "the calibration lesion set")
    if not isinstance(lesions.get("path"), str):
        raise InputError("the calibration lesion set needs the 'path' of its host scans")
    if not Path(lesions["path"]).is_absolute():
        lesions["path"] = str((base / lesions["path"]).resolve())
    seed = lesions.get("seed", VALIDATION_SEED_BASE)
    if not isinstance(seed, int) or seed < VALIDATION_SEED_BASE:
        raise InputError(f"the calibration lesion set's seed must be {VALIDATION_SEED_BASE} or more (its lesions "
                         f"are validation lesions), got {seed!r}")
    for key in ("lesions", "per_copy"):
        value = lesions.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"the calibration lesion set's {key} must be a whole number above 0, got {value!r}")
    options = {k: v for k, v in section.items() if k not in ("lesions", "stage1_bf16", "spare_large")}
    try:
        check_options(**options, fp_per_scan=fp_per_scan)
    except InputError:
        raise
    except (TypeError, ValueError) as exc:
        raise InputError(f"the calibration section's options are not numbers or lists of numbers ({exc})") from None
    for key in ("stage1_bf16", "spare_large"):
        if not isinstance(section.get(key, False), bool):
            raise InputError(f"calibration.{key} must be true or false, got {section[key]!r}")


def settings_from_config(config: dict) -> TrainSettings:
    """The ``TrainSettings`` of a config (defaults for what it omits)."""
    d = TrainSettings()
    budget = config.get("time_budget_minutes")
    return TrainSettings(
        stage1=StageSchedule(**{**asdict(d.stage1), **config.get("stage1", {})}),
        stage1_refine=StageSchedule(**{**asdict(d.stage1_refine), **config.get("stage1_refine", {})}),
        stage2=StageSchedule(**{**asdict(d.stage2), **config.get("stage2", {})}),
        patch1=int(config.get("patch1", d.patch1)),
        positive_fraction=float(config.get("positive_fraction", d.positive_fraction)),
        seed=int(config.get("seed", d.seed)),
        validate_every=int(config.get("validate_every", d.validate_every)),
        patience=int(config.get("patience", d.patience)),
        time_budget_s=None if budget is None else 60.0 * float(budget),
        target_fp_per_scan=float(config.get("target_fp_per_scan", d.target_fp_per_scan)),
        augment=bool(config.get("augment", True)),
        balance_lesions=bool(config.get("balance_lesions", d.balance_lesions)),
        tissue_negatives=int(config.get("tissue_negatives", d.tissue_negatives)),
        stage2_rotate=bool(config.get("stage2_rotate", d.stage2_rotate)),
        min_target_mm=float(config.get("min_target_mm", d.min_target_mm)),
        thick_slices=bool(config.get("thick_slices", d.thick_slices)),
        scanner_augmentation=bool(config.get("scanner_augmentation", d.scanner_augmentation)),
        small_attached_weight=float(config.get("small_attached_weight", d.small_attached_weight)),
        elastic_mm=float(config.get("elastic_mm", d.elastic_mm)),
        min_target_ignores_dense=bool(config.get("min_target_ignores_dense", d.min_target_ignores_dense)),
        dot_negative_fraction=float(config.get("dot_negative_fraction", d.dot_negative_fraction)),
        random_convolution=float(config.get("random_convolution", d.random_convolution)),
        stage2_random_convolution=float(config.get("stage2_random_convolution", d.stage2_random_convolution)),
        stage1_focal_gamma=float(config.get("stage1_focal_gamma", d.stage1_focal_gamma)),
    )


def lesion_mix(fields: dict) -> LesionMix:
    """A ``LesionMix`` from the ``mix`` fields of an ``insert`` entry (unknown fields: ``InputError``)."""
    try:
        return LesionMix(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except TypeError as exc:
        raise InputError(f"bad lesion mix {fields}: {exc}") from None


def cases_from_source(source: dict, seed: int) -> list[TrainingCase]:
    """Load the cases of one data source (see the module docs), inserting lesions if asked."""
    if "phantoms" in source:
        return phantom_cases(int(source["phantoms"]), seed=int(source.get("seed", seed)),
                             **source.get("phantom_options", {}))
    ds = Dataset.open(source["path"], source.get("scans"), negatives=True)
    insert = source.get("insert")
    slab = source.get("slice_mm")
    cases = []
    for n, scan in enumerate(ds.scans):
        volume = read_ct(scan.path)
        suffix = ""
        if slab is not None and slab > volume.geometry.spacing[2]:
            volume, suffix = thicken_volume(volume, float(slab)), f"-{float(slab):g}mm"
        nodules = [(np.array(f.center_lps), float(f.diameter_mm)) for f in scan.annotations]
        ignore = [(np.array(f.center_lps), avoid_radius_mm(f.diameter_mm)) for f in (*scan.excluded, *scan.masses)]
        listed = [np.array(p, float) for p in scan.negatives]
        if not insert:
            cases.append(TrainingCase(volume, None, nodules, ignore, name=scan.seriesuid + suffix, negatives=listed))
            continue
        lungs = lung_mask(volume).mask
        mix = lesion_mix(insert.get("mix") or {})
        distractors = int(insert.get("distractors", 0))
        avoid = [(p, avoid_radius_mm(d)) for p, d in nodules] + ignore
        for copy in range(int(insert.get("copies", 1))):
            rng = np.random.default_rng([int(insert.get("seed", seed)), n, copy])
            specs = sample_lesion_specs(int(insert.get("lesions_per_scan", 20)), rng, mix)
            new, labels, inserted = insert_lesions(volume, lungs, specs, rng, avoid=avoid)
            if distractors:
                keep_out = avoid + [(np.array(x.center_lps), x.diameter_mm / 2) for x in inserted]
                new = insert_distractors(new, lungs, distractors, rng, keep_out=keep_out)
            # Real nodules of a host keep their (unknown) outline out of the loss: ignore, not target.
            lesions = [(np.array(x.center_lps), x.diameter_mm) for x in inserted]
            cases.append(TrainingCase(new, labels, lesions, ignore + [(p, d / 2 + 2.0) for p, d in nodules],
                                      name=copy_name(f"{scan.seriesuid}{suffix}", int(insert.get("seed", seed)), copy),
                                      kinds=[(x.spec.texture, x.spec.shape, x.spec.position) for x in inserted],
                                      negatives=listed))
            log.info("%s copy %d: %d lesions inserted", scan.name, copy, len(inserted))
    return cases


def _prepare_sources(sources: list[dict], model: NoduleModel, seed: int, min_target_mm: float = 0.0,
                     ignore_dense: bool = False) -> list[PreparedCase]:
    out = []
    for source in sources:
        for case in cases_from_source(source, seed):
            prepared = prepare_case(case, model, min_target_mm, ignore_dense)
            case.label_map = None  # the working-grid target is kept; the input-grid copy is not needed
            out.append(prepared)
    return out


class RunFiles:
    """The files of a run in ``outdir``, written by rank 0 only."""

    def __init__(self, outdir: Path, active: bool) -> None:
        self.outdir, self.active = outdir, active
        self.log = outdir / "train_log.jsonl"
        self.checkpoint = outdir / "checkpoint.pt"
        self.model = outdir / "model.safetensors"
        self.card = outdir / "model_card.md"
        self.curves = outdir / "training_curves.png"
        self.config = outdir / "config.json"
        self.trained = outdir / "trained_model.safetensors"  # before calibration, when the config calibrates
        self.calibration_lesions = outdir / "calibration_lesions"
        self.calibration = outdir / "calibration"

    def append_log(self, record: dict) -> None:
        if self.active:
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def save_checkpoint(self, model: NoduleModel, trainer_state: dict) -> None:
        if not self.active:
            return
        payload = {"model": model.state_tensors(), "trainer": trainer_state, "config": model.config.to_json()}
        with atomic_path(self.checkpoint, overwrite=True) as tmp:
            torch.save(payload, tmp)

    def load_checkpoint(self) -> dict | None:
        if not self.checkpoint.is_file():
            return None
        try:
            return torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure to read is the same user-facing error
            raise NoduleDetectionError(f"cannot resume: {self.checkpoint} is unreadable ({exc})") from None


def _distributed() -> tuple[int, int]:
    """``(rank, world_size)`` from ``torchrun``'s environment; initialises the process group if > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return rank, world


def run_training(config_path: str | os.PathLike, outdir: str | os.PathLike, resume: bool = False,
                 device: str = "auto", show_progress: bool = False) -> Path:
    """Train a model as ``config_path`` says; write the run's files into ``outdir``; return the model path."""
    from tqdm.auto import tqdm

    config = load_config(config_path)
    outdir = Path(outdir)
    rank, world = _distributed()
    files = RunFiles(outdir, active=rank == 0)
    if files.model.exists() and not resume:
        raise NoduleDetectionError(f"{files.model} already exists; choose another output folder or --resume")
    if files.log.exists() and not resume:
        raise NoduleDetectionError(f"{outdir} holds a started run; pass --resume to continue it")
    outdir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    settings = settings_from_config(config)
    if config.get("init_model"):
        model = NoduleModel.load(config["init_model"])
        model.config.card = {}
        given = ((config.get("model") or {}).get("stage1") or {})
        model.config.stage1 = replace(  # checked as a new model's are
            model.config.stage1, **{k: given[k] for k in FINE_TUNE_SETTINGS if given.get(k) is not None})
        afresh = [s for s in STAGES if s not in config.get("init_stages", STAGES)]
        if afresh:
            fresh = NoduleModel.build(model.config, seed=settings.seed)
            for stage in afresh:
                setattr(model, stage, getattr(fresh, stage))
    else:
        model = model_from_config(config, settings.seed)
    state = files.load_checkpoint() if resume else None
    if state is not None:
        for prefix, net in (("stage1", model.stage1), ("stage2", model.stage2)):
            net.load_state_dict({k[len(prefix) + 1:]: v for k, v in state["model"].items()
                                 if k.startswith(prefix + ".")})
        log.info("resuming from %s (%s, step %d)", files.checkpoint, state["trainer"]["stage"],
                 state["trainer"]["step"])
    if files.active:
        write_text_atomic(files.config, json.dumps(config, indent=2), overwrite=True)

    t0 = time.perf_counter()
    train_cases = _prepare_sources(config["train"], model, settings.seed, settings.min_target_mm,
                                   settings.min_target_ignores_dense)
    val_cases = _prepare_sources(config.get("validation") or [], model, settings.seed)
    data_seconds = time.perf_counter() - t0
    log.info("data: %d training cases, %d validation cases (%.0f s)", len(train_cases), len(val_cases), data_seconds)

    bars: dict[str, tqdm] = {}
    elapsed0 = float(state["trainer"].get("elapsed_s", 0.0)) if state else 0.0

    def hook(stage: str, step: int, steps: int, value: float) -> bool:
        elapsed = elapsed0 + time.perf_counter() - t0
        if stage == "validation":
            files.append_log({"stage": "validation", "step": step, "steps": steps, "loss": None,
                              "val_cpm": value, "elapsed_s": round(elapsed, 1)})
            return True
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            bars[stage] = tqdm(total=steps, initial=step - 1, desc=f"training {stage}",
                               disable=not (show_progress and files.active))
        bars[stage].update(1)
        bars[stage].set_postfix(loss=f"{value:.4f}")
        files.append_log({"stage": stage, "step": step, "steps": steps, "loss": value, "val_cpm": None,
                          "elapsed_s": round(elapsed, 1)})
        return True

    trainer = Trainer(model, train_cases, val_cases, settings, device=str(dev), hook=hook, rank=rank, world_size=world)
    if settings.time_budget_s is not None:
        trainer.started -= elapsed0

    def checkpoint(trainer_state: dict) -> None:
        trainer_state["elapsed_s"] = elapsed0 + time.perf_counter() - t0
        files.save_checkpoint(model, trainer_state)

    samples = trainer.train(state["trainer"] if state else None, checkpoint)
    threshold = trainer.choose_threshold()
    final_cpm = trainer.weight_cpm.get(model.config.stage2.weight)
    for bar in bars.values():
        bar.close()
    seconds = elapsed0 + time.perf_counter() - t0
    files.append_log({"stage": "done", "step": 0, "steps": 0, "loss": None, "val_cpm": final_cpm,
                      "elapsed_s": round(seconds, 1)})
    model.config.card = {
        "format": "NoduleDetection model card",
        "tool_version": __version__,
        "trained": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "training_seconds": round(seconds, 1),
        "data_seconds": round(data_seconds, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}, device {dev}",
        "processes": world,
        "config": config,
        "training_cases": [c.case.name for c in train_cases],
        "training_lesions": int(sum(len(c.case.lesions) for c in train_cases)),
        "stage2_samples": {"positives": int(samples.labels.sum()), "negatives": int((samples.labels == 0).sum()),
                           **samples.counts()},
        "validation_cases": [c.case.name for c in val_cases],
        "validation_lesions": int(sum(len(c.case.lesions) for c in val_cases)),
        "validation_cpm_inserted": final_cpm,
        "stage2_weight": model.config.stage2.weight,
        "validation_cpm_by_stage2_weight": {f"{w:g}": v for w, v in trainer.weight_cpm.items()},
        "threshold": threshold if threshold is not None else model.config.threshold,
        "threshold_rule": f"lowest probability with <= {settings.target_fp_per_scan} false positives per "
                          "validation scan (inserted-lesion validation cases)",
        "limits": "Research software, not a medical device. Trained without LUNA16.",
    }
    if dev.type == "cuda":
        model.config.card.update({
            "gpu": torch.cuda.get_device_name(dev),
            "mixed_precision": "float16 autocast with gradient scaling",
            "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated(dev) / 2**20),
        })
    if files.active:
        if config.get("calibration"):
            model.save(files.trained, overwrite=True)
            t1 = time.perf_counter()
            model = calibrate_run(config["calibration"], files, settings.target_fp_per_scan, str(dev),
                                  show_progress)
            model.config.card["calibration_seconds"] = round(time.perf_counter() - t1, 1)
            files.append_log({"stage": "calibration", "step": 0, "steps": 0, "loss": None, "val_cpm": None,
                              "calibration_cpm": model.config.card["calibration"]["chosen"]["cpm"],
                              "elapsed_s": round(elapsed0 + time.perf_counter() - t0, 1)})
        model.save(files.model, overwrite=True)
        write_text_atomic(files.card, model_card_markdown(model.config.card), overwrite=True)
        plot_log(files.log, files.curves)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return files.model


def calibrate_run(section: dict, files: RunFiles, fp_per_scan: float, device: str = "auto",
                  show_progress: bool = False) -> NoduleModel:
    """Insert the ``calibration`` section's lesion set (``make_lesion_dataset``) and calibrate the run's trained
    model on it with the section's options (``calibrate``); return the calibrated model."""
    lesions = dict(section["lesions"])  # make_lesion_dataset's arguments; what it omits keeps their defaults
    with progress_bar("calibration lesions", disable=not show_progress) as progress:
        make_lesion_dataset(lesions.pop("path"), files.calibration_lesions, overwrite=True, progress=progress,
                            **lesions)
    options = {k: v for k, v in section.items() if k != "lesions"}
    with progress_bar("calibrating", disable=not show_progress) as progress:
        paths = calibrate(files.calibration_lesions, files.calibration, model=files.trained, fp_per_scan=fp_per_scan,
                          device=device, overwrite=True, progress=progress, **options)
    return NoduleModel.load(paths["model"])


def model_from_config(config: dict, seed: int) -> NoduleModel:
    """A freshly initialised model with the config's ``model`` fields over ``ModelConfig``'s defaults."""
    defaults = json.loads(ModelConfig().to_json())
    return NoduleModel.build(ModelConfig.from_dict({**defaults, **config.get("model", {})}), seed=seed)


def model_card_markdown(card: dict) -> str:
    """A readable model card from the ``card`` dict stored in the model file."""
    lines = ["# NoduleDetection model card", "",
             "Research software, **not a medical device**. Trained **without LUNA16** (not reachable here).", ""]
    for key, value in card.items():
        if key not in ("config", "format", "calibration"):
            lines.append(f"- **{key.replace('_', ' ')}**: {value}")
    if "calibration" in card:  # its whole grid is in calibration.json
        record, chosen = card["calibration"], card["calibration"]["chosen"]
        lines.append(f"- **calibration** (the model's operating point, in place of the stage 2 weight and threshold "
                     f"chosen in training): CPM {chosen['cpm']:.3f} on the {record['nodules']} lesions of "
                     f"{record['dataset']}; " + ", ".join(f"{k} {v}" for k, v in chosen.items() if k != "cpm"))
    lines += ["", "## Training config", "", "```json", json.dumps(card.get("config", {}), indent=2), "```", ""]
    return "\n".join(lines)


def plot_log(log_path: Path, png_path: Path) -> Path:
    """Plot the loss per step of each stage and the validation CPM from ``train_log.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, refine_from = _refinement_as_stage1([json.loads(line) for line in log_path.read_text().splitlines()
                                                  if line.strip()])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, stage in zip(axes, ("stage1", "stage2")):
        steps = [r["step"] for r in records if r["stage"] == stage]
        loss = [r["loss"] for r in records if r["stage"] == stage]
        if loss:
            k = max(1, len(loss) // 50)
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax.plot(steps, loss, color="0.8", lw=0.8, label="loss")
            ax.plot(steps[k - 1:], smooth, color="C0", lw=1.5, label=f"loss ({k}-step mean)")
        ax.set_title(f"{stage}: {'U-net' if stage == 'stage1' else '3D CNN'}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        vals = [(r["step"], r["val_cpm"]) for i, r in enumerate(records) if r["stage"] == "validation"
                and _stage_of_validation(records, i) == stage]
        if vals:
            ax2 = ax.twinx()
            ax2.plot(*zip(*vals), "o-", color="C3", label="validation CPM")
            ax2.set_ylim(0, 1)
            ax2.set_ylabel("validation CPM", color="C3")
        if stage == "stage1" and refine_from is not None:
            ax.axvline(refine_from + 0.5, color="0.4", ls="--", lw=1, label="refinement from here")
        if loss:
            ax.legend(loc="upper right", fontsize=8)
        else:  # e.g. a stage kept from the init model
            ax.text(0.5, 0.5, "not trained in this run", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    with atomic_path(png_path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return png_path


def _refinement_as_stage1(records: list[dict]) -> tuple[list[dict], int | None]:
    """The log with stage 1's refinement (and its validations) as stage 1 records whose steps go on from stage 1's
    last one, and that step (``None`` without a refinement). The refinement starts from stage 1's best validated
    weights, which may be from before its last step."""
    out, last1, refine_from, phase = [], 0, None, "stage1"
    for r in records:
        if r["stage"] in PHASES:
            phase = r["stage"]
        if r["stage"] == "stage1":
            last1 = r["step"]
        if phase == "stage1_refine" and r["stage"] in ("stage1_refine", "validation"):
            refine_from = last1
            r = {**r, "stage": "stage1" if r["stage"] == "stage1_refine" else "validation",
                 "step": r["step"] + last1}
        out.append(r)
    return out, refine_from


def _stage_of_validation(records: list[dict], index: int) -> str:
    for r in reversed(records[:index]):
        if r["stage"] in ("stage1", "stage2"):
            return r["stage"]
    return "stage1"
