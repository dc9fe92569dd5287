"""One dataclass per job, saved as `config.json` beside the job's outputs before any work."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthbreast.fileio import atomic_write_json

# A field's metadata says whether it is part of the job's identity (what decides its outputs):
# two runs may share an output folder, resume or skip as done only if their identities agree.
IDENTITY = "identity"
RUN_ONLY = "run-only"  # how the job runs, not what it writes (workers, device, force, out ...)
INPUT = "input"  # a path whose contents count: the identity holds the input's sha256 instead


def run_only(default: Any = dataclasses.MISSING) -> Any:
    """A config field that changes how a job runs but not what it writes."""
    return dataclasses.field(default=default, metadata={IDENTITY: RUN_ONLY})


def input_path(default: Any = dataclasses.MISSING) -> Any:
    """A config field naming an input whose sha256 (given by the job) stands in the identity."""
    return dataclasses.field(default=default, metadata={IDENTITY: INPUT})


def run_only_fields(kind: type) -> tuple[str, ...]:
    """The fields of config class `kind` that are not part of its jobs' identity."""
    return tuple(f.name for f in dataclasses.fields(kind) if f.metadata.get(IDENTITY) == RUN_ONLY)


def identity_fields(kind: type) -> tuple[str, ...]:
    """The fields of config class `kind` that are part of its jobs' identity (inputs included)."""
    return tuple(f.name for f in dataclasses.fields(kind) if f.metadata.get(IDENTITY) != RUN_ONLY)


def identity(config: Any, inputs: dict[str, Any] | None = None, **resolved: Any) -> dict[str, Any]:
    """The identity of a job: its config's identity fields, each input field replaced by the
    sha256 in `inputs`, then `resolved` (values the job settles, e.g. a default class) on top."""
    inputs = inputs or {}
    out = {}
    for f in dataclasses.fields(config):
        role = f.metadata.get(IDENTITY)
        if role == RUN_ONLY:
            continue
        if role == INPUT:
            if f.name not in inputs:
                raise TypeError(f"identity of {type(config).__name__} needs the sha of {f.name}")
            out[f.name] = inputs[f.name]
        else:
            out[f.name] = getattr(config, f.name)
    return {**out, **resolved}


def identity_differences(before: dict[str, Any], now: dict[str, Any], name: Any = str) -> list[str]:
    """Each key of the identity `now` that `before` (read back from JSON) holds another value
    of, as "<name(key)> <before> there, <now> now"; tuples and lists compare equal."""
    return [
        f"{name(k)} {before.get(k)!r} there, {v!r} now"
        for k, v in now.items()
        if _jsonable(before.get(k)) != _jsonable(v)
    ]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def with_resolved_paths(config: Any, *names: str) -> Any:
    """`config` with the named path fields (a path, a list of paths, or None) absolute and
    resolved, so one folder spelled two ways (relative, absolute, via a symlink) is one job."""

    def resolve(value: Any) -> Any:
        if value is None or value == "":
            return value
        if isinstance(value, (list, tuple)):
            return [resolve(v) for v in value]
        return str(Path(value).resolve())

    return dataclasses.replace(config, **{n: resolve(getattr(config, n)) for n in names})


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a job config, with its kind so a reader knows which job wrote it."""
    return {"job": type(config).__name__, **dataclasses.asdict(config)}


def save_config(config: Any, path: Path) -> None:
    atomic_write_json(path, to_dict(config))


def dumps(config: Any) -> str:
    return json.dumps(to_dict(config), indent=2)


def load_config(path: Path, kind: type) -> Any:
    """The `kind` dataclass a `--config FILE` holds (what `--dry-run` prints, or `submit`
    writes); a file of another job, an unknown field or a missing one is a UserError."""
    from synthbreast.errors import UserError

    where = f"--config {path}"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(
            f"{where}: cannot read it ({err.strerror}); write one with the command's --dry-run"
        ) from None
    except ValueError as err:
        raise UserError(f"{where} is not JSON ({err}): write it with --dry-run > FILE") from None
    if not isinstance(data, dict) or data.get("job", kind.__name__) != kind.__name__:
        job = data.get("job") if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{where} holds a {job} config, not {kind.__name__}: give this command's")
    data = {k: v for k, v in data.items() if k != "job"}
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(
            f"{where}: unknown field(s) {', '.join(unknown)} for {kind.__name__}: remove them, "
            "or write the file again with the command's --dry-run"
        )
    missing = [
        f.name
        for f in dataclasses.fields(kind)
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise UserError(
            f"{where}: missing field(s) {', '.join(missing)} of {kind.__name__}: add them, or "
            "write the file again with the command's --dry-run"
        )
    return kind(**data)


@dataclass
class DemoDataConfig:
    """`synthbreast demo-data`: the procedural, clearly-not-real demo dataset, in the IDC
    layout (histology patches) or the mias layout (whole grey mammograms)."""

    out: str
    patients: int = 20  # mias: women, two films each
    per_class: int = 50  # idc: patches per class per patient (mias: not used)
    seed: int = 0
    patch_size: int = 50
    overwrite: bool = False
    format: str = "idc"  # data/demo.py DEMO_FORMATS: idc | mias


@dataclass
class IngestConfig:
    """`synthbreast ingest`: an image folder -> WebDataset shards split by patient into pools."""

    src: str = run_only()
    out: str = run_only()
    format: str = "idc"
    patient_regex: str | None = None  # imagefolder: a regex with a (?P<patient>...) group
    # patches: their expected side; mammograms: the side of the cut patches (default 224)
    patch_size: int | None = None  # None = the format's default
    channels: int | None = None  # 1 | 3; None = from the data (1 when every image is grey)
    table: str | None = None  # csv: the table, relative to SRC; None = the one .csv in SRC
    # Mammograms (mias, csv with coordinates): how patches are cut (data/mammo.py registries)
    labels: str | None = None  # LABEL_MAPS name; None = the format's default
    context: str = "bbox"  # CONTEXTS: bbox (lesion box + context_percent) | zoom (zoom_levels)
    context_percent: float = 20.0  # bbox: tissue added around the lesion's box, % of its side
    min_crop: int = 0  # bbox: the smallest crop side, source pixels (0: the box alone decides)
    zoom_levels: list[float] = dataclasses.field(default_factory=lambda: [1.0])  # crop/patch
    healthy_per_image: int = 2  # healthy patches drawn from the breast mask of each image
    healthy_gap: int = 32  # pixels a healthy crop keeps from every lesion's edge
    min_tissue: float = 0.9  # share of a healthy crop that must be breast (not background)
    pectoral: str = "auto"  # healthy crops keep out of the pectoral muscle: auto (MLO views)
    # | exclude (every image) | keep (data/mammo.py PECTORAL_MODES)
    small_patches: str = "error"  # error | pad | drop, for patches smaller than patch_size
    skip_bad: bool = False  # skip (and count) corrupt, truncated, empty or mislabelled files
    seed: int = 0
    gan_fraction: float = 0.5  # share of images (by whole patients) the GAN may see
    test_fraction: float = 0.3  # share of the classification pool held out for testing
    balance: str = "none"  # none | undersample (equal classes inside every pool)
    max_per_class: int | None = None  # sample at most this many images per class (paper: 78,000)
    shard_size: int = 5000  # at most this many samples per shard
    min_shards: int = 8  # per pool, so that ranks x workers all get shards
    workers: int = run_only(2)  # processes that decode and check images
    overwrite: bool = run_only(False)
    resume: bool = run_only(False)


@dataclass
class InspectConfig:
    """`synthbreast inspect`: verify shards against their manifest, count, and draw grids."""

    shards: str
    out: str | None = None  # where the grids go; default SHARDS/inspect
    grid_per_class: int = 64
    seed: int = 0
    count: bool = True  # read every shard to count pool/class/patient


@dataclass
class TrainGANConfig:
    """`synthbreast train-gan`: a GAN of the model registry on one pool (and class) of the shards.

    `batch_size` is the global batch, split evenly over the processes, so one process and
    N processes train the same arithmetic. Schedules are in kimg (thousands of real images).
    A conditional model (`msggan-cond`) trains every class at once, each batch holding the
    classes in equal shares, so a rare class gets as much training as a common one.
    """

    shards: str
    outdir: str = "runs"  # run folders are numbered inside: <outdir>/00003-<description>
    pool: str = "gan"
    class_label: int | None = None  # None: every class in one model
    model: str = "msggan"  # synthbreast/models/registry.py MODELS
    resolution: int = 64
    latent_dim: int = 512
    width: float = 1.0  # channel multiplier: 1.0 = the paper; smaller for CPUs
    g_fmap_min: int = 0  # the generator's channel floor at every scale (0: D's floor, 16)
    g_padding: str = "zeros"  # generator conv padding: zeros (the paper) | reflect
    g_upsample: str = "nearest"  # generator x2 upsampling: nearest (the paper) | bilinear
    g_noise: str = "none"  # per-pixel noise in G (StyleGAN): none (the paper) | all | coarse
    g_condition: str = "input"  # msggan-cond's G reads the label: input | modulate (every block)
    # msggan-cond: AC-GAN's class cross-entropy (D on reals, G on fakes at a tenth) with this
    # weight, from an auxiliary classifier in D; 0 = projection discriminator alone
    class_weight: float = 0.0
    batch_size: int = 16
    optimizer: str = "rmsprop"  # rmsprop (the paper) | adam (betas 0, 0.99: official MSG-GAN)
    lr: float = 1e-4
    loss: str = "wgan-gp"  # wgan-gp (the paper) | logistic-r1 (StyleGAN2)
    gp_weight: float = 10.0  # wgan-gp
    gp_interval: int = 1  # wgan-gp: lazy penalty every N steps (weighted by N); 1 = the paper
    drift: float = 0.001  # wgan-gp
    r1_gamma: float = 0.1  # logistic-r1: R1 weight
    r1_interval: int = 16  # logistic-r1: lazy R1 every N steps
    augment: str = "none"  # none | diffaug | ada: augmentation of D's inputs (real and fake)
    dihedral: bool = False  # random flips/90-degree rotations of the real images
    ema_kimg: float = 10.0  # EMA half-life in kimg, as in StyleGAN2-ADA
    kimg: float = 1000.0  # training length
    tick_kimg: float = 4.0  # a progress line every tick
    snapshot_kimg: float = 50.0  # sample grid, quality metric and checkpoint
    checkpoint_kimg: float = 50.0
    metric_images: int = 500  # generated images per class for the snapshot metric (0: off)
    mixed_precision: str = "no"  # no | fp16 | bf16
    seed: int = 0
    workers: int = 2  # DataLoader workers per process
    grid_size: int = 64
    resume: str | None = None  # None, "auto" (latest run of the same description) or a path
    budget: str | None = None  # tiny | small | paper: the preset this config came from


@dataclass
class GenerateConfig:
    """`synthbreast generate`: a trained generator -> synthetic shards in the real schema.

    Shard i's latents come from a seed derived from (seed, class, i) alone, so any shard can be made
    by any process or array task, bit for bit.
    """

    checkpoint: str = input_path()  # a run folder (its latest checkpoint) or one ckpt-*.json
    out: str = run_only()
    shards: int = 76
    per_shard: int = 1000
    class_label: int | None = None  # None: the class the GAN was trained on
    snapshot: str = run_only("best")  # best (by the run's snapshot metric) | latest | a step number
    seed: int = 0
    shard_range: str | None = run_only(None)  # "START:END", end exclusive; None: all or Slurm's
    output_size: int | None = None  # None: the model's resolution; e.g. 50 = real patch size
    batch_size: int = 100
    # none: every image drawn; class-probe: only images a texture probe fitted on the GAN's
    # training pool labels their class (synthbreast/eval/quality.py, ClassFilter)
    filter: str = "none"


@dataclass
class ImportSyntheticConfig:
    """`synthbreast import-synthetic`: images made by any generator -> synthetic shards as
    `generate` writes them, one folder per class (OUT/class<C>/). Paths are stored absolute:
    an OUT holds one import, and a rerun is compared with it."""

    folder: str  # FOLDER/<class>/*.png|jpg|jpeg, or the files a --labels CSV names
    out: str = run_only()
    labels: str | None = None  # a CSV with columns path,label (path relative to FOLDER)
    real: str | None = None  # an ingest folder: its class names and image size are the rule
    generator: str | None = None  # what made the images, e.g. "StyleGAN2-ADA 64px, lab X"
    size: int | None = None  # resize every image to size x size (bicubic); None: keep, one size
    skip_bad: bool = False  # skip (and count) unreadable, mislabelled or odd-sized files
    shard_size: int = 1000  # at most this many images per shard (generate's --per-shard)


@dataclass
class PipelineConfig:
    """`synthbreast pipeline`: data -> ingest -> GAN (one conditional, or one per class) ->
    generate -> classify -> fidelity -> report, on one machine; every stage skips what is
    already complete."""

    out: str
    demo: bool = False  # the embedded demo data (written to OUT/data)
    data: str | None = None  # else a real image folder
    format: str = "idc"
    small_patches: str = "pad"  # real IDC has border patches under 50 px: pad them with white
    skip_bad: bool = False
    budget: str = "small"  # tiny | small | paper (synthbreast/chain.py PIPELINE_BUDGETS)
    per_class_gans: bool = False  # the paper's one MSG-GAN per class; default one conditional
    keep_going: bool = False  # classify even when the generator collapsed (the report warns)
    filter: str | None = None  # generate's --filter: None = the budget's
    backbone: str | None = None  # classifier backbone: None = the budget's
    weights: str | None = None  # classifier weights: None = the budget's (none, or imagenet)
    weights_path: str | None = None
    seed: int = 0
    workers: int = 2


@dataclass(frozen=True)
class PipelineBudget:
    """What one `--budget` of `pipeline` and `submit all` means for every stage of the chain.
    The GAN's settings are train-gan's own budget of that name (synthbreast/train/gan.py)."""

    demo_patients: int
    demo_per_class: int
    gan_budget: str  # a key of synthbreast/train/gan.py BUDGETS
    gan_kimg: float | None  # None: the GAN budget's length
    synth_shards: int  # per class
    synth_per_shard: int
    classify_epochs: int
    input_size: str
    backbone: str
    weights: str
    fidelity_extractors: tuple[str, ...]  # () = fidelity's default extractors
    synth_filter: str = "none"  # generate's --filter (synthbreast/generate.py FILTERS)
    # array tasks of each feature pass under Slurm (`submit all`), the classifier's and
    # fidelity's: each task embeds its block of the shards once, before the stage that reads
    # them all (the scenario array, the fidelity job)
    feature_tasks: int = 2


@dataclass
class GateConfig:
    """`synthbreast gate`: the collapse gate between generation and classification."""

    synthetic: list[str] = dataclasses.field(default_factory=list)  # generate outputs
    keep_going: bool = False  # pass a collapsed set on (the report then carries a warning)


@dataclass
class ClassifyConfig:
    """`synthbreast classify`: one transfer-learning scenario (synthbreast/eval/scenarios.py).

    The paper's protocol is the default: ImageNet ResNet18, all frozen but a new 2-class fc,
    224 px inputs, Adam lr 1e-3, batch 32, 150 epochs. Writes OUT/<scenario>/.
    """

    out: str = run_only()  # run folders go to OUT/<scenario>/, cached features to OUT/features/
    real: str | None = None  # an ingest shard folder (pools gan / train / test)
    synthetic: list[str] = dataclasses.field(default_factory=list)  # generate outputs/parents
    scenario: str | None = None  # a scenario name, or "all"
    task_id: int | None = None  # or the scenario's index (a Slurm array task)
    backbone: str = "resnet18"  # resnet18 | resnet50 | efficientnet-lite0 (models/classifier.py)
    weights: str = "imagenet"  # imagenet (file, never downloaded) | none (random init)
    weights_path: str | None = None  # None: the torch hub cache's torchvision file
    mode: str = "frozen"  # frozen (only the fc learns; BatchNorm statistics kept) | finetune
    input_size: str = "224"  # a side in pixels (224 = the paper), or "native"
    epochs: int = 150
    batch_size: int = 32
    lr: float = 1e-3
    synth_ratio: float = 1.0  # real+synth-real: synthetic images per real one, per class
    seed: int = 0  # model init, batch order, synthetic split and bootstrap
    cache_features: bool = True  # frozen: backbone features computed once per image
    feature_cache: str | None = run_only(None)  # None: OUT/features
    feature_batch_size: int = run_only(128)  # images per backbone call when computing features
    # only this process's share of the cached features (torchrun rank, Slurm array block), no
    # training: many processes fill the cache, then one `classify` trains on it
    features_only: bool = run_only(False)
    n_boot: int = 1000  # bootstrap resamples of the 95% intervals
    device: str = run_only("auto")  # auto (cuda if present) | cpu | cuda | cuda:1 ...
    force: bool = run_only(False)  # redo a scenario whose metrics.json exists


@dataclass
class StudyConfig:
    """`synthbreast study`: does adding synthetic images to the real training images help?
    Patient-level stratified k-fold cross-validation over the real patients of the ingest's
    train and test pools (never the gan pool: the GAN saw those patients), real-only (ratio 0)
    against real plus ratio x synthetic images per class, repeated over seeds, with the
    classifier of `synthbreast classify` (synthbreast/eval/study.py). One task per
    (seed, fold, ratio), or per (seed, fold, SinGAN model count) with `singan_models`; writes
    OUT/config.json, OUT/tasks/<task>.json and OUT/summary.json.
    """

    out: str = run_only()
    real: str  # an ingest shard folder: the patients of its train and test pools are split
    synthetic: list[str] = dataclasses.field(default_factory=list)  # generate outputs/parents
    folds: int = 5
    synth_ratios: list[float] = dataclasses.field(default_factory=lambda: [0, 0.25, 0.5, 1, 2])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])  # split, init, order
    balance_minority: bool = False  # synthetic for minority classes only: ratio x the gap
    # Model-count arms (the BCDR thesis): arm K adds the same number of images as every other
    # arm (the one ratio > 0 of synth_ratios), drawn from the first K models of the SinGAN
    # selection alone; arm 0 is real only. The synthetic folders are generate-singan outputs.
    # [] = the ratio arms of synth_ratios.
    singan_models: list[int] = dataclasses.field(default_factory=list)
    task_id: int | None = run_only(None)  # one task of the ordered list (Slurm array); None: all
    backbone: str = "resnet18"  # the classifier options are classify's
    weights: str = "imagenet"
    weights_path: str | None = None
    mode: str = "frozen"
    input_size: str = "224"
    epochs: int = 150
    batch_size: int = 32
    lr: float = 1e-3
    cache_features: bool = True  # frozen: classify's per-shard feature cache, shared by tasks
    feature_cache: str | None = run_only(None)  # None: OUT/features
    feature_batch_size: int = run_only(128)
    device: str = run_only("auto")
    force: bool = run_only(False)  # redo tasks whose result exists (same config only)


@dataclass
class ReportConfig:
    """`synthbreast report`: every run under RUNS -> report.md, report.html, metrics.csv."""

    runs: str  # searched recursively for classify, GAN, shard and fidelity results
    out: str
    grid_per_class: int = 64  # patches per class in each real and synthetic sample grid
    seed: int = 0  # which patches the grids show


@dataclass
class FidelityConfig:
    """`synthbreast fidelity`: FID, KID, precision/recall/density/coverage and memorisation of
    synthetic images against real ones, per feature extractor. Writes OUT/fidelity.json."""

    real: str  # an ingest shard folder (pools gan / train / test)
    synthetic: list[str] = dataclasses.field(default_factory=list)  # generate outputs/parents
    out: str = run_only("fidelity")  # fidelity.json, PNGs; cached features in OUT/features/
    extractors: list[str] = dataclasses.field(default_factory=list)  # [] = pixels (+ inception
    # when its weights are present, + classifier when classifier_run is given)
    real_pool: str = "test"  # compared with the synthetic images: unseen patients
    train_pool: str = "gan"  # what the GAN saw: memorisation's reference
    heldout_pool: str = "test"  # memorisation's control: patients the GAN never saw
    floor_pool: str = "train"  # the real-vs-real floor: other unseen patients vs real_pool
    histology_cache: str | None = run_only(None)  # the trained histology space; None: OUT/features
    weights_path: str | None = None  # the Inception extractor's file; None: its default place
    classifier_run: str | None = None  # a classify run folder (config.json, model.safetensors)
    pixels_side: int = 16  # the pixels extractor's side: 16 x 16 x 3 = 768 features
    nearest_k: int = 5  # PRDC's k (Naeem et al. 2020)
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # at most; min(this, images of the smaller set)
    copy_threshold: float = 0.5  # memorisation: distance ratio below which a sample is a copy
    closest_pairs: int = 16  # rows of the closest-pairs grid
    tsne: bool = False  # also a t-SNE scatter (scikit-learn) of at most 2,000 points
    # SiFID of the generate-singan folders among `synthetic` (synthbreast/eval/sifid.py)
    sifid: bool = True
    sifid_space: str | None = None  # sifid.SPACES; None: inception when installed, else texture
    sifid_floor_images: int = 8  # real images of the class each source is compared with
    sifid_variants: int = 100  # at most this many variants per model (shard and index order)
    batch_size: int = run_only(64)
    workers: int = run_only(2)  # DataLoader workers reading shards
    device: str = run_only("auto")  # auto (cuda if present) | cpu | cuda | cuda:1 ...
    seed: int = 0  # KID subsets, plot subsamples
    force: bool = run_only(False)  # redo when OUT/fidelity.json exists
    features_only: bool = run_only(False)  # this process's share of OUT/features, then stop


@dataclass
class TrainSinGANConfig:
    """`synthbreast train-singan`: one SinGAN per image, for `images` images of class
    `class_label` in a pool (a seeded choice, OUTDIR/selection.json), each in OUTDIR/models/.
    The defaults are the paper's (250 px longer side, 2,000 iterations per scale); budgets in
    synthbreast/train/singan.py. `task_id`: that model alone (a Slurm array task)."""

    shards: str = run_only()
    outdir: str = run_only("singan")
    pool: str = "gan"
    class_label: int | None = None  # required: the class whose images get a model each
    images: int = 4  # models, one per selected image
    seed: int = 0  # the choice of images, initial weights and every noise draw
    task_id: int | None = run_only(None)  # train model K of the selection only; None: all, in turn
    model: str = "singan"  # synthbreast/models/registry.py MODELS (trainer "singan")
    max_size: int = 250  # the image is shrunk so its longer side is at most this
    min_size: int = 25  # the coarsest scale's shorter side
    scale_factor_init: float = 0.75  # the number of scales from it; then made exact
    nfc: int = 32  # channels of the coarsest scales; doubled every 4 scales
    max_nfc: int = 128
    layers: int = 5  # conv blocks per generator and discriminator
    iterations: int = 2000  # per scale
    d_steps: int = 3  # critic steps per iteration
    g_steps: int = 3  # generator steps per iteration
    lr: float = 5e-4  # Adam (betas 0.5, 0.999), G and D
    lr_drop: float = 0.8  # the rate x0.1 after this share of a scale's iterations
    rec_weight: float = 10.0  # the reconstruction loss's weight (the paper's alpha)
    gp_weight: float = 0.1  # WGAN-GP's weight (the official code's lambda_grad)
    noise_amp_init: float = 0.1  # noise amplitude = this x RMSE of the coarser reconstruction
    checkpoint_every: int = 250  # iterations between mid-scale checkpoints
    device: str = run_only("auto")  # auto (cuda when present) | cpu | cuda | cuda:1 ...
    # CPU threads per model: one image's small convs ran 20x slower on 2 threads than on 1 on
    # the loaded 2-core dev box (bench/singan_speed.py); None: torch's default
    threads: int | None = 1
    budget: str | None = None  # tiny | small | paper: the preset this config came from


@dataclass
class GenerateSinGANConfig:
    """`synthbreast generate-singan`: the models of a train-singan OUTDIR -> synthetic shards
    in the real schema. Sample i of shard s comes from model (s * per_shard + i) mod models,
    so every model gives the same share; shard s's noise comes from (seed, class, s) alone."""

    models: str = input_path()  # a train-singan --outdir (its selection.json and models/)
    out: str = run_only()
    num_models: int | None = run_only(None)  # the first K models of the selection; None: all
    shards: int = 4
    per_shard: int = 250
    inject_scale: int = 0  # 0: new layouts from scale 0; k: the source's layout below scale k
    output_size: int | None = None  # None: the real patch size (the source images' side)
    seed: int = 0
    shard_range: str | None = run_only(None)  # "START:END", end exclusive; None: all or Slurm's
    batch_size: int = 16
    device: str = run_only("cpu")  # cpu | auto | cuda...: a GPU gives other bits than the CPU
    threads: int | None = run_only(1)  # CPU threads (see TrainSinGANConfig.threads)
