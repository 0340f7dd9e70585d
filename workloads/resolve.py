"""Turn a workload name, a flavour, field overrides and/or a TOML file into a Workload.

Precedence: preset (or the config's ``base``) < config file < ``overrides``.

Config file (see workloads/examples/small-moe.toml)::

    name = "small-moe"            # optional; default: the file's stem (or the base's name)
    base = "mixtral-8x7b"         # optional: start from a preset ...
    flavor = "proxy"              # ... in this flavour (default: the flavor argument)
    batch_size = 4                # sequences per rank per step
    seq_len = 256
    capacity_factor = 1.2         # a positive number, or "dropless"
    notes = "free text"
    [layer]   model_dim, ffn_dim, num_experts, top_k, activation, expert_bias
    [model]   n_layers, n_heads, n_kv_heads, vocab_size, moe_every, norm, dense_ffn_dim

Capacity factor: ``"dropless"`` means no capacity limit (``None`` in the
code; TOML has no null). When the key is absent a ``base`` keeps its own
value and a workload built from scratch is **dropless**: nothing is dropped
unless the user asks for a capacity.

Built from scratch (no ``base``, or the name ``custom``): model_dim, ffn_dim,
num_experts and top_k are required; the rest defaults to activation "gelu",
no expert bias, batch 4 x seq 256 (1024 tokens per rank, the proxy
flavour's), 2 blocks all MoE, head_dim 64 (one head when 64 does not divide
model_dim), n_kv_heads = n_heads, vocab 32000, and layernorm for GELU/ReLU
experts or rmsnorm for SwiGLU. Its flavor is "custom".

Every error is an InputError (core/errors.py) of one line naming the file, the
line (where the text sets the key; tomllib's own syntax errors carry theirs)
and the key: ``small.toml:9: layer.top_k must be an integer, got 'two'``.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import replace
from pathlib import Path

from core.errors import InputError
from core.names import unknown_name_message
from core.toml_lines import header_line, key_line, read_utf8, syntax_error_line, syntax_error_text
from core.values import COMMON_ROUTER, LayerShape, is_finite_positive
from workloads.flavors import get_workload
from workloads.spec import ModelShape, Workload

LAYER_FIELDS = {"model_dim": int, "ffn_dim": int, "num_experts": int, "top_k": int, "activation": str,
                "expert_bias": bool, "score": str, "renormalize": bool, "score_bias": bool, "n_groups": int,
                "topk_groups": int, "route_scale": float, "shared_ffn_dim": int}
MODEL_FIELDS = {"n_layers": int, "n_heads": int, "n_kv_heads": int, "vocab_size": int, "moe_every": int,
                "norm": str, "dense_ffn_dim": int, "first_dense": int}
# The override router=softmax replaces a workload's declared router by the common softmax one (every
# system can run it, so a fine-grained shape's speed is comparable on identical work everywhere).
ROUTER_CHOICES = ("declared", "softmax")
RUN_FIELDS = {"batch_size": int, "seq_len": int, "capacity_factor": float}
TOP_LEVEL_KEYS = {"name": str, "base": str, "flavor": str, "notes": str, **RUN_FIELDS}
REQUIRED_LAYER = ("model_dim", "ffn_dim", "num_experts", "top_k")
DROPLESS = "dropless"
DEFAULT_BATCH, DEFAULT_SEQ, DEFAULT_HEAD_DIM, DEFAULT_VOCAB = 4, 256, 64, 32000
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # names go into trial ids ("/"-separated)


def _capacity_factor(where: str, value, coerce: bool) -> float | None:
    """A finite positive float, or None for "dropless"; InputError naming `where` otherwise."""
    if value is None or value == DROPLESS:
        return None
    if isinstance(value, str) and coerce:
        try:
            value = float(value)
        except ValueError:
            pass
    if not is_finite_positive(value):
        raise InputError(f"{where}capacity_factor must be a positive number or \"dropless\", got {value!r}",
                         "capacity_factor")
    return float(value)


def _check_type(where: str, key: str, value, kind: type, coerce: bool):
    """The value as `kind`, or InputError naming `where`.`key`."""
    if key == "capacity_factor":
        return _capacity_factor(where, value, coerce)
    if coerce and isinstance(value, str) and kind is not str:
        if kind is bool and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        elif kind is int and re.fullmatch(r"[+-]?\d{1,4000}", value.strip()):  # int() stops at 4300 digits
            value = int(value)
        elif kind is float and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value.strip()):
            value = float(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise InputError(f"{where}{key} must be an integer, got {value!r}", key)
    if kind is not int and not isinstance(value, kind):
        raise InputError(f"{where}{key} must be a {kind.__name__}, got {value!r}", key)
    return value


class _ConfigText:
    """A config file's path and lines, to say where in it a key is set."""

    def __init__(self, path: Path, text: str):
        self.path, self.lines = path, text.splitlines()

    def at(self, key: str | None = None, table: str | None = None) -> str:
        """``path:line: `` where `key` of `[table]` is set (or the table's header); ``path: `` when the
        text does not set it."""
        line = key_line(self.lines, key, table) if key else None
        if line is None and table is not None and key is None:
            line = header_line(self.lines, table)
        return f"{self.path}:{line}: " if line else f"{self.path}: "


def _table_of(key: str) -> str | None:
    """The config table a workload field is written in ([layer], [model], or the top level)."""
    return "layer" if key in LAYER_FIELDS else "model" if key in MODEL_FIELDS else None


def _read_toml(path: Path) -> tuple[dict, _ConfigText]:
    text = read_utf8(path, "workload config", InputError)
    try:
        return tomllib.loads(text), _ConfigText(path, text)
    except ValueError as exc:  # TOMLDecodeError, or int()'s digit limit on a 5000-digit number
        line = syntax_error_line(exc)
        where = f"{path}:{line}" if line else str(path)
        raise InputError(f"{where}: invalid TOML in workload config: {syntax_error_text(exc)}") from None


def _parse_config(path: Path) -> tuple[dict, dict, dict, _ConfigText]:
    """(top-level fields, layer fields, model fields, the text), type-checked, unknown keys rejected."""
    data, text = _read_toml(path)
    top, layer, model = {}, {}, {}
    for key, value in data.items():
        if key in ("layer", "model"):
            if not isinstance(value, dict):
                raise InputError(f"{text.at(key)}'{key}' must be a table ([{key}]), got {value!r}", key)
            fields, target = (LAYER_FIELDS, layer) if key == "layer" else (MODEL_FIELDS, model)
            for sub, sub_value in value.items():
                if sub not in fields:
                    message = unknown_name_message("key", f"{key}.{sub}", [f"{key}.{f}" for f in fields])
                    raise InputError(f"{text.at(sub, key)}{message}", sub)
                target[sub] = _check_type(f"{text.at(sub, key)}{key}.", sub, sub_value, fields[sub], coerce=False)
        elif key in TOP_LEVEL_KEYS:
            top[key] = _check_type(text.at(key), key, value, TOP_LEVEL_KEYS[key], coerce=False)
        else:
            message = unknown_name_message("key", key, [*TOP_LEVEL_KEYS, "layer", "model"])
            raise InputError(f"{text.at(key)}{message}", key)
    return top, layer, model, text


def _split_overrides(overrides: dict) -> tuple[dict, dict, dict]:
    run, layer, model = {}, {}, {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue  # "not given" (an argparse default); dropless is spelled "dropless"
        if key == "router":
            if value not in ROUTER_CHOICES:
                raise InputError(unknown_name_message("router", value, ROUTER_CHOICES), "router")
            if value == "softmax":
                layer.update(COMMON_ROUTER)
            continue
        for fields, target in ((LAYER_FIELDS, layer), (MODEL_FIELDS, model), (RUN_FIELDS, run)):
            if key in fields:
                target[key] = _check_type("override ", key, value, fields[key], coerce=True)
                break
        else:
            raise InputError(unknown_name_message("workload override", key, [*LAYER_FIELDS, *MODEL_FIELDS,
                                                                              *RUN_FIELDS, "router"]), key)
    return run, layer, model


def _from_scratch(name: str, where: str, run: dict, layer: dict, model: dict) -> Workload:
    missing = [key for key in REQUIRED_LAYER if key not in layer]
    if missing:
        raise InputError(f"{where}a custom workload needs {', '.join(REQUIRED_LAYER)}; missing {', '.join(missing)}",
                         missing[0])
    shape = LayerShape(**{"activation": "gelu", "expert_bias": False, **layer})
    dim = shape.model_dim
    heads = dim // DEFAULT_HEAD_DIM if isinstance(dim, int) and dim % DEFAULT_HEAD_DIM == 0 and dim > 0 else 1
    heads = model.get("n_heads", heads)
    model_fields = {"n_layers": 2, "n_heads": heads, "n_kv_heads": heads, "vocab_size": DEFAULT_VOCAB,
                    "moe_every": 1, "norm": "rmsnorm" if shape.activation == "swiglu" else "layernorm", **model}
    return Workload(
        name=name,
        flavor="custom",
        layer=shape,
        model=ModelShape(**model_fields),
        batch_size=run.get("batch_size", DEFAULT_BATCH),
        seq_len=run.get("seq_len", DEFAULT_SEQ),
        capacity_factor=run.get("capacity_factor"),
        sources={"dims": "user-defined"},
    )


def _apply(workload: Workload, run: dict, layer: dict, model: dict) -> Workload:
    return replace(
        workload,
        layer=replace(workload.layer, **layer),
        model=replace(workload.model, **model),
        **run,
    )


def _describe(changes: dict) -> str:
    return ", ".join(f"{k}={'dropless' if v is None and k == 'capacity_factor' else v}" for k, v in changes.items())


def _from_config(path: Path, flavor: str, notes: list[str]) -> tuple[Workload, _ConfigText]:
    """The workload a config file describes (before overrides), and the file's text for later errors."""
    top, layer, model, text = _parse_config(path)
    run = {key: top[key] for key in RUN_FIELDS if key in top}
    if "base" in top:
        try:
            base = get_workload(top["base"], top.get("flavor", flavor))
        except InputError as exc:
            key = exc.field if exc.field in top else "base"
            raise InputError(f"{text.at(key)}{exc}", exc.field) from None
        workload = _apply(base, run, layer, model)
        workload = replace(workload, name=top.get("name", workload.name))
        notes.append(f"from config {path} on {top['base']}/{workload.flavor}")
    else:
        if "flavor" in top:
            raise InputError(f"{text.at('flavor')}'flavor' needs 'base' (a workload built from scratch has "
                             "flavor custom)", "flavor")
        workload = _from_scratch(top.get("name", path.stem), text.at(table="layer"), run, layer, model)
        notes.append(f"from config {path}")
    if "notes" in top:
        notes.append(top["notes"])
    return workload, text


def _located(exc: InputError, text: _ConfigText | None, overridden: dict) -> InputError:
    """`exc` with the config file's line of its field in front; the command line's own values (overrides)
    and workloads without a file are named as they are."""
    if text is None or exc.field in overridden:
        return exc
    return InputError(f"{text.at(exc.field, _table_of(exc.field)) if exc.field else text.at()}{exc}", exc.field)


def resolve_workload(
    name: str | None, flavor: str = "proxy", overrides: dict | None = None, config_file: str | None = None
) -> Workload:
    """The Workload described by a preset name or "custom", a flavour, overrides and/or a config file."""
    o_run, o_layer, o_model = _split_overrides(overrides or {})
    notes, text = [], None
    if config_file is not None:
        path = Path(config_file)
        if name not in (None, "custom"):
            raise InputError(
                f"both workload {name!r} and config {path} given; put base = \"{name}\" in the config instead"
            )
        workload, text = _from_config(path, flavor, notes)
    elif name is None:
        raise InputError("no workload given: name a preset, 'custom', or pass a config file", "workload")
    elif name == "custom":
        workload = _from_scratch("custom", "", o_run, o_layer, o_model)
    else:
        workload = get_workload(name, flavor)
    if name != "custom" or config_file is not None:
        workload = _apply(workload, o_run, o_layer, o_model)
        if o_run or o_layer or o_model:
            notes.append(f"overridden: {_describe({**o_layer, **o_model, **o_run})}")
    if notes:
        workload = replace(workload, notes="; ".join(filter(None, [workload.notes, *notes])))
    try:
        if not NAME_PATTERN.match(workload.name):
            raise InputError(f"workload name {workload.name!r} must be letters, digits, '.', '_', '+' or '-'",
                             "name")
        workload.validate()
    except InputError as exc:
        raise _located(exc, text, {**o_run, **o_layer, **o_model}) from None
    return workload
