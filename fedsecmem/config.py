"""Run configuration: YAML files validated by pydantic models.

Every tunable number of a run lives here with its default, so nothing is
buried in code. ``load_config`` turns any validation problem into a one-line
``UserError`` that names the field and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedsecmem.errors import UserError
from fedsecmem.methods import METHODS, supporting
from fedsecmem.protocols.graph import check_sparse_graph
from fedsecmem.protocols.secagg import default_threshold

__all__ = [
    "AuditConfig", "BackboneConfig", "CkksConfig", "ClientsConfig", "DEFECT_FAMILIES", "DataConfig",
    "DeployConfig", "ExecutionConfig", "FEDERATED", "FLConfig", "FMNIST_ANOMALY_CLASSES", "FMNIST_NORMAL_CLASSES",
    "FedDyMemConfig", "GovernanceConfig", "MemoryConfig", "OutputConfig", "PredictConfig", "PrivacyConfig", "RunConfig", "ScoringConfig",
    "SecAggConfig", "SecureConfig", "Strict", "TEXTURE_PRODUCTS", "config_from_dict", "load_config",
    "parse_overrides",
]

TEXTURE_PRODUCTS = ("brick", "grass", "gravel", "retina", "immunohistochemistry", "cell")
DEFECT_FAMILIES = ("perlin_blend", "cutpaste_scar", "scratch", "stain", "blur")
FMNIST_NORMAL_CLASSES = (0, 1, 2, 5, 7, 8)
FMNIST_ANOMALY_CLASSES = (3, 4, 6, 9)


FEDERATED = supporting("federated")  # methods that aggregate over a protocol
MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    """Which benchmark and how much of it."""

    benchmark: Literal["textures", "fmnist", "fmnist_ovr", "mvtec", "elpv"] = "textures"
    root: Path | None = Field(
        None, description="fmnist: folder of the idx files; mvtec: dataset root (required)"
    )
    image_size: int = Field(160, ge=32, le=1024, description="model input side in pixels")
    # textures
    products: list[str] = Field(default_factory=lambda: list(TEXTURE_PRODUCTS))
    train_per_product: int = Field(40, ge=1)
    test_normal_per_product: int = Field(20, ge=1)
    test_defect_per_product: int = Field(20, ge=1)
    defects: list[str] = Field(default_factory=lambda: list(DEFECT_FAMILIES))
    crop_size: int = Field(160, ge=32, description="textures: side of a crop in source pixels")
    # fmnist
    normal_classes: list[int] = Field(default_factory=lambda: list(FMNIST_NORMAL_CLASSES))
    anomaly_classes: list[int] = Field(default_factory=lambda: list(FMNIST_ANOMALY_CLASSES))
    normal_class: int = Field(0, ge=0, le=9, description="fmnist_ovr: the one normal class")
    test_per_class: int = Field(100, ge=1, description="fmnist: test images per class")
    # mvtec
    categories: list[str] | None = Field(None, description="mvtec: categories (default: all)")
    # elpv (train_per_product / test_normal_per_product / test_defect_per_product count cells per
    # wafer type: normal = defect probability 0, defective = 1)
    uncertain_per_product: int = Field(20, ge=0, description="elpv: test cells of defect probability 1/3 "
                                       "and as many of 2/3 per wafer type (scored apart, never in the headline AUROC)")
    window: tuple[float, float] | None = Field(None, description="mvtec: VOI window (center, width) for DICOM, NIfTI "
                                               "and 16-bit images (null: a DICOM's own window, else the full range); "
                                               "a site's model keeps it, so predict converts alike")
    slice_axis: int = Field(2, ge=0, le=2, description="mvtec: the axis NIfTI volumes are sliced along")
    patients: Path | None = Field(None, description="CSV image,patient (image = <product>/<n>): each training "
                                  "image's patient, for privacy.unit: patient (mvtec: or train/good/<patient>/)")

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        bad = [p for p in self.products if p not in TEXTURE_PRODUCTS]
        if bad:
            raise ValueError(f"products: unknown {bad}, expected some of {list(TEXTURE_PRODUCTS)}")
        bad = [d for d in self.defects if d not in DEFECT_FAMILIES]
        if bad:
            raise ValueError(f"defects: unknown {bad}, expected some of {list(DEFECT_FAMILIES)}")
        for name in ("normal_classes", "anomaly_classes"):
            vals = getattr(self, name)
            if any(not 0 <= c <= 9 for c in vals):
                raise ValueError(f"{name}: expected classes in 0..9, got {vals}")
        if set(self.normal_classes) & set(self.anomaly_classes):
            raise ValueError("normal_classes and anomaly_classes overlap")
        if self.window is not None and not self.window[1] > 0:
            raise ValueError(f"window: the width must be positive, got {self.window[1]:g}")
        if self.benchmark == "mvtec" and self.root is None:
            raise ValueError("root: required for benchmark 'mvtec' (path to the dataset)")
        return self


class ClientsConfig(Strict):
    """How the training data is split over clients (products skewed by a Dirichlet)."""

    n: int = Field(5, ge=1, le=1000)
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration; small = strong skew")
    min_train: int = Field(2, ge=1, description="every client gets at least this many train images")


class BackboneConfig(Strict):
    """Frozen pretrained feature extractor."""

    name: str = "tf_efficientnet_lite0"
    weights: str = Field(
        "builtin",
        description="'builtin' (packaged EfficientNet-Lite0 weights), a path to a state dict, or 'hub'",
    )
    layers: list[int] = Field(default_factory=lambda: [2, 3], min_length=2, max_length=2)
    image_layer: int | None = Field(
        4, description="stage pooled into an image-level embedding (null = no image memory)"
    )
    pool_size: int = Field(3, ge=1, description="local average pooling window on patch features")
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    batch_size: int = Field(32, ge=1)
    allow_network: bool = Field(False, description="allow 'hub' weights to be downloaded")


class MemoryConfig(Strict):
    """Local memory bank (greedy k-center coreset of patch embeddings)."""

    coreset_ratio: float = Field(0.1, gt=0, le=1, description="share of patches kept in the bank")


class ScoringConfig(Strict):
    """Nearest-neighbour scoring of patches and images."""

    primary: Literal["patch", "image"] = Field(
        "patch", description="which score is reported as auroc.image"
    )
    image_k: int = Field(2, ge=1, description="k of the kNN image-level score (DN2 uses 2)")
    reweight_k: int = Field(0, ge=0, description="PatchCore eq. 7: scale the max patch distance by "
                            "1 - softmax over its nearest item's k nearest neighbours (anomalib: 9); "
                            "0 = the plain max (docs/benchmarks.md measures both)")
    smoothing_sigma: float = Field(4.0, ge=0, description="Gaussian sigma of anomaly maps (pixels)")
    pro: bool = Field(True, description="compute the per-region-overlap (PRO) score where masks exist")


class FedDyMemConfig(Strict):
    """Federated dynamic memory (method feddymem) and the generator shared by the baselines."""

    rounds: int = Field(3, ge=1)
    use_generator: bool = Field(True, description="false = memory sharing only (ablation)")
    memory_dim: int | None = Field(None, ge=2, description="memory space dimension (null = backbone's)")
    hidden: int = Field(256, ge=1, description="hidden width of the generator MLP")
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(1024, ge=2)
    max_steps_per_epoch: int = Field(50, ge=1)
    lr: float = Field(1e-3, gt=0)
    var_weight: float = Field(2.0, ge=0, description="weight of the anti-collapse spread term (>= 2 stops any shrinking: see metric_loss)")
    reduce_ratio: int = Field(16, ge=1, description="patches pooled into one prototype (1 = no reduce)")
    reduce_iters: int = Field(3, ge=0, description="Lloyd iterations of the within-image reduce")
    global_k: int = Field(512, ge=1, description="global patch memory items (server k-means k)")
    global_k_images: int = Field(64, ge=1, description="global image-level memory items")
    kmeans_iters: int = Field(20, ge=1)
    share_images: bool = Field(True, description="share image-level embeddings for the global image memory")
    score_with: Literal["local+global", "local", "global"] = "local+global"
    global_near: float | None = Field(None, gt=0, description="score only with the global items within this "
                                      "many covering radii of the client's own bank (null = every item): other "
                                      "products' items then never meet this client's defects (docs/feddymem.md)")
    kmeans_init: Literal["auto", "kmeans++", "pca-partition"] = Field(
        "auto", description="global k-means seeding: kmeans++ needs the server to see the prototypes "
        "(plain only); pca-partition releases only sums (auto: kmeans++ for plain, else pca-partition)")
    prox_mu: float = Field(0.01, ge=0, description="FedProx proximal coefficient (method fedprox)")


class FLConfig(Strict):
    """Parameter-sharing baselines' extras (docs/baselines.md): Weight Scope Alignment and FedSM."""

    wsa_weight: float = Field(0.0, ge=0, description="Weight Scope Alignment on fedavg/fedprox (0 = off)")
    softpull: float = Field(1.0, ge=0, description="fedsm: SoftPull coefficient lambda pulling each "
                            "personalized generator towards the global one (0 = local training)")
    selector_hidden: int = Field(64, ge=1, description="fedsm: hidden width of the model selector")
    selector_epochs: int = Field(20, ge=1, description="fedsm: local epochs of the selector per round")
    selector_lr: float = Field(1e-2, gt=0, description="fedsm: the selector's learning rate")


class SecAggConfig(Strict):
    """SecAgg+ masking (protocol secagg)."""

    bits: Literal[32, 64] = Field(64, description="ring Z_(2^bits) of the masked sums")
    frac_bits: int = Field(24, ge=0, le=40, description="fixed-point fractional bits")
    neighbours: int | None = Field(None, ge=1, description="k of the k-regular graph (null = complete graph)")
    threshold: int | None = Field(None, ge=2, description="Shamir threshold t (null = majority of k + 1)")
    rounding: Literal["nearest", "stochastic"] = "nearest"
    # a sparse graph (neighbours < n - 1) must meet Bell et al. 2020's bounds for these fractions
    dropout_fraction: float = Field(0.1, ge=0, lt=1, description="clients expected to drop out in a round")
    collusion_fraction: float = Field(0.1, ge=0, lt=1, description="clients that may collude with the server")
    security_bits: int = Field(40, ge=1, le=128, description="a sparse graph exposes an input with "
                                                             "probability at most 2^-security_bits")
    correctness_bits: int = Field(20, ge=1, le=128, description="a sparse graph fails a sum with probability "
                                                                "at most 2^-correctness_bits")

    @model_validator(mode="after")
    def _check(self) -> "SecAggConfig":
        if self.frac_bits > self.bits - 2:
            raise ValueError(f"frac_bits: at most bits - 2 = {self.bits - 2} for a {self.bits}-bit ring")
        return self


class CkksConfig(Strict):
    """TenSEAL CKKS (protocol ckks); SEAL refuses parameters below 128-bit security."""

    poly_modulus_degree: int = Field(8192, description="ring degree N; N/2 values per ciphertext")
    coeff_mod_bit_sizes: list[int] = Field(default_factory=lambda: [60, 60])
    scale_bits: int = Field(40, ge=10, le=60)


class SecureConfig(Strict):
    """Options of the secure protocols and of secure k-means."""

    secagg: SecAggConfig = Field(default_factory=SecAggConfig)
    ckks: CkksConfig = Field(default_factory=CkksConfig)
    pca_dims: int = Field(16, ge=1, description="subspace of the PCA-partition k-means initialization")


class PrivacyConfig(Strict):
    """Differential privacy (method feddymem): one training image is the privacy unit."""

    dp: bool = False
    delta: float = Field(1e-5, gt=0, lt=1)
    epsilon: float | None = Field(None, gt=0, description="target epsilon: calibrate the noise multiplier "
                                  "to spend it over the run (null = use noise_multiplier)")
    noise_multiplier: float = Field(1.0, ge=0, description="noise std / sensitivity of every release and "
                                    "DP-SGD step when epsilon is null (0 = clipping only, epsilon infinite)")
    epsilon_budget: float | None = Field(None, gt=0, description="refuse any round, and any release, that "
                                         "would take a client past this epsilon (null: the target epsilon; "
                                         "set it above the target to let a run re-run a round cut short)")
    accountant: Literal["pld", "rdp", "prv"] = Field("pld", description="pld (dp_accounting, the tightest sound one), rdp or prv (Opacus)")
    noise: Literal["distributed", "local", "central"] = Field(
        "distributed", description="distributed: each client adds 1/t of the variance (secagg, ckks); "
        "local: each adds all of it; central: a trusted server adds it")
    min_survivors: int | None = Field(None, ge=1, description="contributions distributed noise counts on "
                                      "(null = the SecAgg+ threshold, or a majority of clients for ckks)")
    clip_norm: float = Field(60.0, gt=0, description="L2 clip of memory-space patch prototypes (public "
                             "constant: ~99th percentile of EfficientNet-Lite0 patch features on ImageNet-like images)")
    image_clip_norm: float = Field(45.0, gt=0, description="L2 clip of image-level embeddings")
    kmeans_iters: int = Field(2, ge=0, description="Lloyd steps of the private k-means (fixed schedule)")
    sgd_clip: float = Field(1.0, gt=0, description="per-image gradient clip of DP-SGD")
    sgd_sample_rate: float = Field(0.25, gt=0, le=1, description="Poisson sampling rate of DP-SGD, the same at "
                                   "every site: public, so neither it nor the steps (local_epochs / rate a round) "
                                   "tell how many images a site holds")
    sgd_batch_images: int = Field(8, ge=1, description="divisor of DP-SGD's noisy gradient sum (a typical site's "
                                  "expected batch; public, whatever a site holds)")
    unit: Literal["image", "patient"] = Field("image", description="what the guarantee protects: one training "
                                              "image, or one patient with all their images (data.patients)")


class OutputConfig(Strict):
    map_examples_per_product: int = Field(2, ge=0, description="anomaly maps in the PNG grid")
    embedding_cache: Path | None = Field(
        None, description="folder to keep backbone embeddings across runs of the same data (null = off)"
    )


class AuditConfig(Strict):
    """Ledgers and leakage measurement (docs/audits.md)."""

    ledger: bool = Field(True, description="every party keeps a signed, hash-chained ledger in OUT/ledger")
    leakage: bool = Field(False, description="membership inference against each adversary's view (feddymem; "
                          "every method then trains without the withheld images, for like-for-like tables)")
    shadows: int = Field(8, ge=2, description="LiRA shadow releases per client (even)")
    holdout_fraction: float = Field(0.25, gt=0, lt=1, description="share of each client's training images "
                                    "withheld from training as non-members (only with leakage)")
    fpr: float = Field(0.01, gt=0, lt=1, description="the low false-positive rate TPR is reported at")
    bootstrap: int = Field(1000, ge=50, description="bootstrap resamples for the confidence intervals")

    @model_validator(mode="after")
    def _check(self) -> "AuditConfig":
        if self.shadows % 2:
            raise ValueError(f"shadows: {self.shadows} must be even (complementary halves)")
        return self


class ExecutionConfig(Strict):
    """Where the clients of ``fedsecmem run`` live (docs/scaling.md)."""

    backend: Literal["inprocess", "ray"] = Field("inprocess", description="inprocess: every client in this "
                                                 "process; ray: each client a Ray actor holding only its own data")
    address: str = Field("", description="ray: empty = a local Ray started for the run; else the address of an "
                         "existing cluster (e.g. ray://head:10001 or auto)")
    cpus_per_client: float = Field(0.0, ge=0, description="ray: CPUs each client actor reserves (0: none, so "
                                   "any number of clients share a local Ray; 1 or more on a cluster)")
    gpus_per_client: float = Field(0.0, ge=0, description="ray: GPUs each client actor reserves (0 = CPU)")
    local_cpus: int | None = Field(None, ge=1, description="ray: CPUs of the local Ray (null = all)")
    clients_per_actor: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="ray: clients one actor process holds, each apart with its own session, data and "
        "ledger (auto: one actor per CPU of the Ray cluster, or per cpus_per_client CPUs, at most one per "
        "client; each actor process holds torch and the backbone, and an actor call per exchange costs more "
        "when processes outnumber cores)")
    threads_per_client: int | None = Field(None, ge=1, description="ray: torch threads of each client actor "
                                           "(null = this process's count, which gives the in-process run's numbers "
                                           "bit for bit; 1 when many actors share few cores)")


class PredictConfig(Strict):
    """The model each site keeps and its decisions (docs/predict.md)."""

    save_models: bool = Field(True, description="write each site's model folder (OUT/models/client-<i>) at the "
                              "run's end, for `fedsecmem predict` and `fedsecmem export`")
    calibration_fraction: float = Field(0.2, ge=0, lt=1, description="share of each site's training normals "
                                        "kept out of its bank to calibrate its threshold (0 = no threshold)")
    target_fpr: float = Field(0.05, gt=0, lt=1, description="false-positive rate the threshold aims at on new "
                              "normal images")
    calibration: Literal["auto", "quantile", "lognormal"] = Field(
        "auto", description="quantile: the conformal quantile of the calibration scores; lognormal: the "
        "quantile of a log-normal fitted to them; auto: quantile once (n + 1) * target_fpr >= 5, else lognormal")


class GovernanceConfig(Strict):
    """Facts an operator states for the privacy report (GDPR Art. 30/35); the toolkit only prints them."""

    controller: str | None = Field(None, description="who decides purposes and means (e.g. the consortium)")
    processors: list[str] = Field(default_factory=list, description="who processes on the controller's behalf")
    legal_basis: str | None = Field(None, description="e.g. Art. 6(1)(e) and Art. 9(2)(j) GDPR")
    purpose: str | None = Field(None, description="why the images are processed")
    contact: str | None = Field(None, description="data-protection officer or contact point")
    retention: str | None = Field(None, description="how long run folders and caches are kept")


class DeployConfig(Strict):
    """Running across processes or machines (``fedsecmem serve`` / ``fedsecmem join``)."""

    address: str = Field("127.0.0.1:50051", description="host:port the server listens on and clients dial")
    certs: Path | None = Field(None, description="folder from `fedsecmem provision` (required to serve or join)")
    register_timeout_s: float = Field(300.0, gt=0, description="how long the server waits for clients to register")
    round_timeout_s: float = Field(900.0, gt=0, description="a client's training and memory rebuild per round")
    stage_timeout_s: float = Field(120.0, gt=0, description="one protocol stage (e.g. SecAgg+ masked inputs)")
    poll_s: float = Field(10.0, gt=0, le=300, description="how long a client's pull waits for its next task")
    reconnect_s: float = Field(120.0, ge=0, description="how long a client keeps retrying an unreachable server")
    max_message_mb: int = Field(64, ge=1, description="largest message either side accepts (a default round's "
                                "largest, the global memory or a k-means vector, is under 1 MB; 64 MB holds "
                                "global_k up to ~50,000 items of 152 dims)")

    @model_validator(mode="after")
    def _check(self) -> "DeployConfig":
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"address: expected host:port, got {self.address!r}")
        return self


class RunConfig(Strict):
    """A whole run."""

    name: str = "run"
    seed: int = 0
    method: MethodName = "local"
    data: DataConfig = Field(default_factory=DataConfig)
    clients: ClientsConfig = Field(default_factory=ClientsConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    feddymem: FedDyMemConfig = Field(default_factory=FedDyMemConfig)
    fl: FLConfig = Field(default_factory=FLConfig)
    protocol: Literal["plain", "secagg", "ckks"] = Field(
        "plain", description="how federated methods aggregate (local and central do not aggregate)")
    secure: SecureConfig = Field(default_factory=SecureConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    governance: GovernanceConfig = Field(default_factory=GovernanceConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)

    @model_validator(mode="after")
    def _check_protocol(self) -> "RunConfig":
        if self.scoring.primary == "image" and self.backbone.image_layer is None:
            raise ValueError("scoring: primary image needs backbone.image_layer (image-level embeddings)")
        if self.protocol != "plain" and self.feddymem.kmeans_init == "kmeans++":
            raise ValueError(f"feddymem: kmeans_init kmeans++ shows the server every prototype; "
                             f"protocol {self.protocol} needs pca-partition (or auto)")
        if self.fl.wsa_weight > 0 and not METHODS[self.method].wsa:
            raise ValueError(f"fl: wsa_weight applies to method {' or '.join(supporting('wsa'))}, not {self.method}")
        pv = self.privacy
        if pv.dp and self.method in FEDERATED:  # local and central release nothing
            if not METHODS[self.method].dp:
                raise ValueError(f"privacy: dp applies to method {' or '.join(supporting('dp'))}, not {self.method}")
            if pv.noise == "distributed" and self.protocol == "plain":
                raise ValueError("privacy: distributed noise needs protocol secagg or ckks (with plain the "
                                 "server sees each client's small share of the noise); use noise: local")
            if pv.noise == "central" and self.protocol == "ckks":
                raise ValueError("privacy: central noise needs a server that sees the sum; ckks hides it")
            if self.feddymem.memory_dim not in (None,):
                raise ValueError("privacy: dp needs feddymem.memory_dim null (the per-image DP-SGD loss "
                                 "measures spread in the backbone's space)")
            if pv.min_survivors is not None and pv.min_survivors > self.clients.n:
                raise ValueError(f"privacy: min_survivors {pv.min_survivors} exceeds clients.n {self.clients.n}")
            if pv.noise == "distributed" and (self.clients.n < 2 or (pv.min_survivors or 2) < 2):
                raise ValueError("privacy: distributed noise needs at least 2 clients in every sum; use noise: local")
        if self.protocol == "secagg" and self.method in FEDERATED:
            a, n = self.secure.secagg, self.clients.n
            if n < 2:
                raise ValueError("clients: secagg needs at least 2 clients")
            k = n - 1 if a.neighbours is None else a.neighbours
            if k > n - 1:
                raise ValueError(f"secure: secagg.neighbours {k} exceeds clients.n - 1 = {n - 1}")
            if k % 2 and n % 2:
                raise ValueError(f"secure: secagg.neighbours {k} is odd and clients.n {n} is odd: "
                                 "no such regular graph exists; use an even number")
            if a.threshold is not None and not (k + 1) / 2 < a.threshold <= k + 1:
                raise ValueError(f"secure: secagg.threshold {a.threshold} must be a majority of the "
                                 f"{k + 1} share holders ({(k + 1) // 2 + 1}..{k + 1})")
            problem = check_sparse_graph(n, k, a.threshold or default_threshold(k), a.dropout_fraction,
                                         a.collusion_fraction, a.security_bits, a.correctness_bits)
            if problem:
                raise ValueError(problem)
        return self

    @property
    def kmeans_init(self) -> str:
        """The global k-means seeding this run uses."""
        if self.feddymem.kmeans_init != "auto":
            return self.feddymem.kmeans_init
        return "kmeans++" if self.protocol == "plain" else "pca-partition"

    @property
    def global_seeding(self) -> str:
        """How the global k-means of this run is seeded: private k-means seeds with a random
        partition of a public, data-independent space; otherwise ``kmeans_init``."""
        return "dp-random-partition" if self.privacy.dp and METHODS[self.method].dp else self.kmeans_init


def _format_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "config"
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    head = msg.split(":", 1)[0]
    if ":" in msg and head.replace("_", "").isalnum():  # a validator naming its own field
        return f"{loc}.{msg}" if loc != "config" else msg
    got = e.get("input")
    if e["type"] not in ("missing",) and not isinstance(got, (dict, list)):
        return f"{loc}: {msg} (got {got!r})"
    return f"{loc}: {msg}"


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings; values are YAML (so 3, 0.5, true, [1,2] work)."""
    out = []
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        if not key:
            raise UserError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def config_from_dict(tree: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    tree = dict(tree or {})
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise UserError(f"config error: {_format_error(err)}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply ``--set`` overrides, validate. Raises ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"config {path}:{where} is not valid YAML") from None
    if not isinstance(tree, dict):
        raise UserError(f"config {path}: expected a mapping at top level")
    return config_from_dict(tree, overrides)
