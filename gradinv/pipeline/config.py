"""params.yaml: one validated config object per stage. Bad values fail before any work starts."""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

from gradinv.errors import UserError
from gradinv.trust import trust_model_code


def _positive(x) -> bool:
    return x > 0


def _non_negative(x) -> bool:
    return x >= 0


def _probability(x) -> bool:
    return 0 <= x <= 1


def _share(x) -> bool:
    return 0 <= x < 1


def _one_of(*choices):
    def check(x) -> bool:
        return x in choices

    check.description = "one of " + ", ".join(repr(c) for c in choices)
    return check


_positive.description = "positive"
_non_negative.description = "non-negative"
_probability.description = "between 0 and 1"
_share.description = "at least 0 and below 1"


def rule(default, check=None, **kwargs):
    """A dataclass field with a default and an optional value check."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"check": check}, **kwargs)
    return field(default=default, metadata={"check": check}, **kwargs)


@dataclass(frozen=True)
class DataConfig:
    source: str = rule("photos", _one_of("photos", "imagefolder"))
    resolution: int = rule(32, lambda x: x >= 16)
    train_per_class: int = rule(160, _positive)
    pool_per_class: int = rule(24, _positive)
    seed: int = rule(0)
    # imagefolder source only: ImageNet layout, one sub-folder per class.
    train_dir: str | None = rule(None)
    pool_dir: str | None = rule(None)
    mean: list = rule([0.485, 0.456, 0.406])
    std: list = rule([0.229, 0.224, 0.225])


@dataclass(frozen=True)
class VictimConfig:
    arch: str = rule("resnet18")
    norm: str = rule("batch", _one_of("batch", "group"))
    weights: str | None = rule(None)
    epochs: int = rule(8, _non_negative)
    batch_size: int = rule(64, _positive)
    lr: float = rule(0.05, _positive)
    weight_decay: float = rule(5e-4, _non_negative)
    seed: int = rule(0)
    device: str = rule("auto")


@dataclass(frozen=True)
class CaptureConfig:
    batch_size: int = rule(8, _positive)
    distinct_labels: bool = rule(True)
    bn_leak: str = rule("exact", _one_of("exact", "none"))
    seed: int = rule(0)
    defenses: list = rule([])
    aggregation_clients: int = rule(1, _positive)


@dataclass(frozen=True)
class LabelsConfig:
    strategy: str = rule("yin", _one_of("yin", "idlg", "counts"))
    posterior_steps: int = rule(1000, _non_negative)
    posterior_restarts: int = rule(2, _positive)


@dataclass(frozen=True)
class InversionConfig:
    iterations: int = rule(400, _positive)
    seeds: int = rule(4, _positive)
    lr: float = rule(0.1, _positive)
    warmup: int = rule(50, _non_negative)
    alpha_grad: float = rule(1e-3, _non_negative)
    alpha_tv: float = rule(1e-4, _non_negative)
    alpha_l2: float = rule(1e-6, _non_negative)
    alpha_bn: float = rule(0.1, _non_negative)
    grad_share: float = rule(0.0, _share)
    first_bn_multiplier: float = rule(10.0, _non_negative)
    bn_prior: str = rule("exact", _one_of("exact", "approx", "none"))
    gradient_distance: str = rule("l2", _one_of("l2", "squared_l2", "l2_relative", "cosine"))
    choose: str = rule("objective", _one_of("objective", "gradient", "consensus"))
    layer_weights: dict = rule({})
    alpha_group: float = rule(0.0, _non_negative)
    group_start: int = rule(0, _non_negative)
    group_refresh: int = rule(100, _positive)
    registration: str = rule("tvl1", _one_of("none", "translation", "ilk", "tvl1"))
    langevin: float = rule(0.0, _non_negative)
    jitter: int = rule(0, _non_negative)
    flip: bool = rule(False)
    checkpoint_every: int = rule(100, _non_negative)
    log_every: int = rule(25, _positive)
    seed: int = rule(0)


@dataclass(frozen=True)
class EngineConfig:
    """How the inversion step is computed: speed and memory only, outside every cache key, except
    `precision` (a half type changes the result beyond float noise)."""
    device: str = rule("auto")
    seed_workers: int = rule(0, _non_negative)
    seed_batch: int = rule(0, _non_negative)
    cuda_graph: bool | str = rule("auto", _one_of("auto", True, False))
    tf32: bool = rule(True)
    keep_freed_memory: bool = rule(True)
    bn_double_backward: str = rule("auto", _one_of("auto", "pytorch", "explicit", "explicit-fused"))
    # Experimental (docs/engine.md), not listed in params.yaml:
    conv_double_backward: str = rule("pytorch", _one_of("pytorch", "explicit", "explicit-grouped"))
    precision: str = rule("float32", _one_of("float32", "bfloat16", "float16"))


# Engine settings that change the result beyond float noise: part of invert's cache and checkpoint keys.
RESULT_CHANGING_ENGINE_SETTINGS = ("precision",)


def result_changing(engine: EngineConfig) -> dict[str, Any]:
    return {k: getattr(engine, k) for k in RESULT_CHANGING_ENGINE_SETTINGS}


@dataclass(frozen=True)
class EvaluationConfig:
    match_distance: str = rule("mse", _one_of("mse", "lpips"))
    lpips_net: str = rule("alex", _one_of("alex", "vgg"))
    lpips_weights: str | None = rule(None)
    registration_max_shift: int = rule(2, _non_negative)
    iip_model: str = rule("victim")
    iip_weights: str | None = rule(None)
    gallery_size: int = rule(0, _non_negative)
    gradient_only: bool = rule(True)
    seed: int = rule(0)


@dataclass(frozen=True)
class BatchesConfig:
    count: int = rule(4, _positive)
    workers: int = rule(2, _positive)
    address: str | None = rule(None)
    gpus_per_task: int = rule(0, _non_negative)


@dataclass(frozen=True)
class SweepConfig:
    batch_sizes: list = rule([2, 4, 8])
    batches: int = rule(2, _positive)


@dataclass(frozen=True)
class AuditConfig:
    clip_norm: float = rule(1.0, _positive)
    noise_sigmas: list = rule([0.0, 1e-4, 1e-3, 1e-2, 1e-1])
    topk_keep: list = rule([1.0, 0.5, 0.1, 0.01])
    aggregation_clients: list = rule([1, 2, 4, 8])
    quantize: list = rule(["float16", "int8", "sign"])
    fedavg_steps: list = rule([1, 2, 5])
    fedavg_lr: float = rule(0.01, _positive)
    fedavg_batch_size: int = rule(4, _positive)
    dp_epsilons: list = rule([])
    dp_max_grad_norm: float = rule(1.0, _positive)
    dp_sample_rate: float = rule(0.01, _positive)
    dp_steps: int = rule(100, _positive)
    dp_delta: float = rule(1e-5, _positive)
    iterations: int = rule(200, _positive)
    seeds: int = rule(2, _positive)


@dataclass(frozen=True)
class FederationConfig:
    client_sizes: list = rule([4, 8, 8, 16])
    split: str = rule("iid", _one_of("iid", "by_class"))
    rounds: int = rule(3, _positive)
    local_epochs: int = rule(1, _positive)
    lr: float = rule(0.01, _positive)
    batch_size: int = rule(4, _positive)
    send_buffers: bool = rule(True)
    seed: int = rule(0)
    attack_rounds: list = rule([1, -1])
    iterations: int = rule(200, _positive)
    seeds: int = rule(2, _positive)
    label_posterior_steps: int = rule(200, _non_negative)
    engine: str = rule("simulation", _one_of("simulation", "deployment"))


@dataclass(frozen=True)
class TuningConfig:
    trials: int = rule(16, _positive)
    batches: int = rule(2, _positive)
    capture_seed: int = rule(100_000)
    iterations: int = rule(300, _positive)
    seeds: int = rule(4, _positive)
    metric: str = rule("psnr", _one_of("psnr", "ssim"))
    sampler_seed: int = rule(0)
    enqueue: list = rule([])


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "victim": VictimConfig,
    "capture": CaptureConfig,
    "labels": LabelsConfig,
    "inversion": InversionConfig,
    "engine": EngineConfig,
    "evaluation": EvaluationConfig,
    "batches": BatchesConfig,
    "sweep": SweepConfig,
    "audit": AuditConfig,
    "federation": FederationConfig,
    "tuning": TuningConfig,
}


def _type_ok(value: Any, hint: Any) -> bool:
    if isinstance(hint, types.UnionType) and type(None) not in get_args(hint):
        return any(_type_ok(value, member) for member in get_args(hint))
    text = str(hint)
    if value is None:
        return "None" in text
    if "bool" in text:
        return isinstance(value, bool)
    if "int" in text:
        return isinstance(value, int) and not isinstance(value, bool)
    if "float" in text:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if "str" in text:
        return isinstance(value, str)
    if "list" in text:
        return isinstance(value, list)
    if "dict" in text:
        return isinstance(value, dict)
    return True


def _finite(value: Any) -> bool:
    """No NaN or infinity anywhere in the value, lists and mappings included."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def build_section(name: str, values: dict | None):
    """Validate one params.yaml section and return its frozen config object."""
    cls = SECTIONS[name]
    values = values or {}
    if not isinstance(values, dict):
        raise UserError(f"params: '{name}' must be a mapping of keys to values.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"params: unknown key '{name}.{unknown[0]}' (known: {', '.join(fields)}).")
    for key, value in values.items():
        if not _type_ok(value, hints[key]):
            raise UserError(f"params: '{name}.{key}' must be of type {hints[key]}, got {value!r}.")
        if not _finite(value):
            raise UserError(f"params: '{name}.{key}' must hold finite numbers (no NaN or infinity), got {value!r}.")
        if isinstance(hints[key], type) and hints[key] is float and isinstance(value, int):
            values = {**values, key: float(value)}
        check = fields[key].metadata.get("check")
        if check is not None and value is not None and not check(value):
            expected = getattr(check, "description", "valid")
            raise UserError(f"params: '{name}.{key}' must be {expected}, got {value!r}.")
    config = cls(**values)
    _check_cross_field(name, config)
    return config


def _check_cross_field(name: str, config) -> None:
    if name == "inversion":
        for prefix, weight in config.layer_weights.items():
            if not isinstance(prefix, str) or isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise UserError(f"params: 'inversion.layer_weights' maps parameter-name prefixes to non-negative numbers, got {prefix!r}: {weight!r}.")
    if name == "evaluation":
        if config.match_distance == "lpips" and not config.lpips_weights:
            raise UserError("params: 'evaluation.match_distance' lpips needs 'evaluation.lpips_weights' (a local backbone weights file).")
        if config.iip_model != "victim" and not config.iip_weights:
            raise UserError("params: 'evaluation.iip_model' other than 'victim' needs 'evaluation.iip_weights' (a local weights file).")
    if name == "capture":
        from gradinv.client.defenses import validate

        checked = validate(config.defenses)
        if checked and checked[0]["kind"] == "fedavg" and config.bn_leak == "exact":
            raise UserError("params: 'capture.bn_leak' exact is not defined under fedavg (every local step has its own "
                            "batch statistics); set it to none.")
    if (name == "engine" and config.precision != "float32" and config.bn_double_backward == "pytorch"
            and config.seed_batch != 1):
        raise UserError(f"params: 'engine.precision' {config.precision} cannot run PyTorch's BatchNorm with the seeds "
                        "batched under vmap (its batching rule fails under autocast); set 'engine.bn_double_backward' "
                        "to auto or explicit, or 'engine.seed_batch' to 1.")
    if name == "audit":
        from gradinv.pipeline.audit_grid import audit_points

        audit_points(config)
    if name == "federation":
        whole = lambda values: all(isinstance(v, int) and not isinstance(v, bool) for v in values)  # noqa: E731
        if not config.client_sizes or not whole(config.client_sizes) or min(config.client_sizes) < 1:
            raise UserError("params: 'federation.client_sizes' must be a non-empty list of positive whole numbers "
                            f"(examples per client), got {config.client_sizes!r}.")
        rounds = config.attack_rounds
        if not whole(rounds) or not all(1 <= r <= config.rounds or -config.rounds <= r <= -1 for r in rounds):
            raise UserError(f"params: 'federation.attack_rounds' must list rounds 1 to {config.rounds} (or -1 for "
                            f"the last), got {rounds!r}.")
    if name == "tuning" and not all(isinstance(e, dict) and build_section("inversion", e) for e in config.enqueue):
        raise UserError(f"params: 'tuning.enqueue' must be a list of inversion settings (mappings), got {config.enqueue!r}.")
    if name == "sweep":
        sizes = config.batch_sizes
        if not sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in sizes):
            raise UserError(f"params: 'sweep.batch_sizes' must be a non-empty list of positive integers, got {sizes!r}.")
    if name == "data":
        for key in ("mean", "std"):
            values = getattr(config, key)
            if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise UserError(f"params: 'data.{key}' must be a list of 3 numbers, got {values!r}.")
        if not all(s > 0 for s in config.std):
            raise UserError(f"params: 'data.std' must be positive, got {config.std!r}.")
        if config.source == "imagefolder" and not (config.train_dir and config.pool_dir):
            raise UserError("params: 'data.train_dir' and 'data.pool_dir' are required when data.source is 'imagefolder'.")


def load_params(path: str | Path = "params.yaml", preset: str | None = None) -> dict[str, Any]:
    """Read params.yaml and validate every section; returns {section: config object}. `preset`
    replaces the file's `preset`. The model spec it names (victim.arch) is the user's, so
    artifacts naming that spec may import it."""
    import yaml  # imported here so that the library runs where only torch is installed

    path = Path(path)
    if not path.is_file():
        raise UserError(f"params file {path} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise UserError(f"params file {path} is not UTF-8 text (byte {err.start} cannot be decoded); "
                        "save it as UTF-8.") from None
    except yaml.YAMLError as err:
        raise UserError(f"params file {path} is not valid YAML ({str(err).splitlines()[0]}).") from None
    if not isinstance(raw, dict):
        raise UserError(f"params file {path} must be a mapping of sections.")
    raw = apply_preset({**raw, "preset": preset} if preset else raw)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise UserError(f"params: unknown section '{unknown[0]}' (known: {', '.join(SECTIONS)}).")
    params = {name: build_section(name, raw.get(name)) for name in SECTIONS}
    trust_model_code(params["victim"].arch)
    return params


def apply_preset(raw: dict) -> dict:
    """`preset: NAME` picks an entry of `presets`, whose sections override the ones written
    out; `preset: null` (or none) leaves the sections as they are."""
    raw = dict(raw)
    name, presets = raw.pop("preset", None), raw.pop("presets", None) or {}
    if not isinstance(presets, dict) or not all(isinstance(v, dict) or v is None for v in presets.values()):
        raise UserError("params: 'presets' must map preset names to sections of overrides.")
    if name is None:
        return raw
    if name not in presets:
        raise UserError(f"params: 'preset' {name!r} is not one of the presets ({', '.join(map(str, presets)) or 'none defined'}).")
    for section, values in (presets[name] or {}).items():
        if section not in SECTIONS:
            raise UserError(f"params: preset {name!r} has the unknown section '{section}' (known: {', '.join(SECTIONS)}).")
        if not isinstance(values, dict):
            raise UserError(f"params: preset {name!r} section '{section}' must be a mapping of keys to values.")
        raw[section] = {**(raw.get(section) or {}), **values}
    return raw


def as_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)
