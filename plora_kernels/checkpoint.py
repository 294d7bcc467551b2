"""Checkpoints of a PLoRA-patched model that restore exactly or refuse: :func:`load_plora`, :func:`save_plora`.

A model saved before :func:`plora_kernels.merge_plora` (a transformers Trainer ``checkpoint-N`` folder,
``model.save_pretrained(dir)``, a ``state_dict``) holds *live* adapters: each patched layer's running ``weight``
plus its ``lora_A``, ``lora_B`` and ``num_unloads``. A plain ``from_pretrained`` of such a folder builds
``nn.Linear`` layers and drops the adapters, so the model computes something else than the one saved (transformers
lists them as unexpected keys and goes on). Only a model patched exactly as the run was can take them back.

How the settings travel. :func:`plora_kernels.apply_plora` records each call's settings on the model (the PLoRA
record: target_modules, r, alpha, momentum, rounding, lora_dropout, adapter_dtype, the number of layers, a format
version and the package version). On a transformers model the record is ``model.config.plora``, and transformers
writes the config into every ``config.json`` it saves, so each ``save_pretrained`` folder and each Trainer
``checkpoint-N`` carries it, with no hook and no extra file. Any other module keeps it as an attribute, and
:func:`save_plora` writes it to ``plora_config.json`` beside the weights (``plora_model.pt``). :func:`merge_plora`
removes it: a merged model is plain.

What :func:`load_plora` does. Given a model class (``from_pretrained``) or a model instance and a checkpoint, it
builds (or takes) the base, replays the recorded ``apply_plora`` calls on it, and loads the weights and adapters:
the result computes what the saved model computed, bit for bit, and the unloads continue as they would have. It
refuses, with a ValueError naming the setting, a model patched differently from the checkpoint (target_modules,
r, alpha, momentum, rounding, lora_dropout, adapter dtype), and a checkpoint holding live adapters without a
record when the model is not patched (it cannot know how to patch it). Every check runs before the model
changes.

What it cannot do: refuse a plain ``LlamaForCausalLM.from_pretrained(checkpoint)``, which never calls this
package. Such a model still carries the record in ``model.config.plora``, and :func:`apply_plora` warns about it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .nn.linear import PLoRALinear, check_layer_args
from .nn.patching import (
    RECORD_FORMAT,
    RECORD_KEY,
    RECORD_SETTINGS,
    module_matcher,
    patch_model,
    plan_calls,
    plora_layers,
    plora_record,
    record_config,
    set_plora_record,
    snapshot_record,
)
from .ops.checks import FLOAT_DTYPES

CONFIG_FILE = "plora_config.json"   # the record beside the weights of a model that has no transformers config
WEIGHTS_FILE = "plora_model.pt"     # save_plora's weights for such a model (torch.save of its state_dict)
# the weights files looked for in a checkpoint folder, in this order
WEIGHTS_FILES = (WEIGHTS_FILE, "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
ADAPTER_KEYS = ("lora_A", "lora_B")


# ----------------------------------------------------------------------------------------- the checkpoint
class _Checkpoint:
    """A checkpoint's record and tensors: a folder, a state-dict file, or a state dict in memory. Tensors are read
    on demand (a safetensors file only for the names asked)."""

    def __init__(self, source):
        self.record = None
        self._files: dict[str, str] = {}     # tensor name -> the file holding it (safetensors, read lazily)
        self._loaded: dict[str, torch.Tensor] = {}
        if isinstance(source, Mapping):
            self.where = "the state dict"
            self._take_state_dict(source)
            return
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"load_plora: path must be a checkpoint folder, a state-dict file or a state dict, got "
                            f"{type(source).__name__}")
        path = Path(source)
        self.where = repr(str(path))
        if path.is_dir():
            self._read_folder(path)
        elif path.is_file():
            self._read_file(path)
        else:
            raise FileNotFoundError(f"load_plora: {str(path)!r} is neither a checkpoint folder nor a file")

    # -- reading
    def _take_state_dict(self, state) -> None:
        bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"load_plora: {self.where} must map names to tensors (a model's state_dict()); "
                             f"{bad[0]!r} is not a tensor entry")
        self._loaded.update(state)

    def _read_file(self, path: Path) -> None:
        if path.suffix == ".safetensors":
            for name in _safetensors_keys(path):
                self._files[name] = str(path)
            return
        if path.name.endswith(".index.json"):
            self._read_index(path)
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise ValueError(f"load_plora: {str(path)!r} holds a {type(state).__name__}, not a state dict")
        self._take_state_dict(state)

    def _read_index(self, path: Path) -> None:
        index = json.loads(path.read_text())
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"load_plora: {str(path)!r} has no weight_map")
        for shard in sorted(set(weight_map.values())):
            self._read_file(path.parent / shard)

    def _read_folder(self, folder: Path) -> None:
        own = folder / CONFIG_FILE
        if own.is_file():
            self.record = json.loads(own.read_text())
        elif (folder / "config.json").is_file():
            config = json.loads((folder / "config.json").read_text())
            self.record = config.get(RECORD_KEY) if isinstance(config, dict) else None
        for name in WEIGHTS_FILES:
            if (folder / name).is_file():
                self._read_file(folder / name)
                return
        raise FileNotFoundError(f"load_plora: no weights in {str(folder)!r}; looked for {', '.join(WEIGHTS_FILES)}")

    # -- access
    def keys(self) -> list[str]:
        return list(self._loaded) + [k for k in self._files if k not in self._loaded]

    def tensors(self, names) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self._loaded:
                by_file.setdefault(self._files[name], []).append(name)
        for file, wanted in by_file.items():
            from safetensors import safe_open

            with safe_open(file, framework="pt", device="cpu") as f:
                for name in wanted:
                    self._loaded[name] = f.get_tensor(name)
        return {name: self._loaded[name] for name in names}

    def adapter_layers(self) -> list[str]:
        """The names of the layers whose adapters the checkpoint holds (``<name>.lora_A`` keys)."""
        return [k[:-len(".lora_A")] if k != "lora_A" else "" for k in self.keys()
                if k == "lora_A" or k.endswith(".lora_A")]


def _safetensors_keys(path: Path) -> list[str]:
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - transformers brings safetensors
        raise ImportError(f"load_plora: reading {str(path)!r} needs the safetensors package") from None
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return list(f.keys())


def _key(layer: str, suffix: str) -> str:
    return f"{layer}.{suffix}" if layer else suffix


# ------------------------------------------------------------------------------------------------ the record
def _check_record(record, where: str) -> dict:
    """The record, checked (ValueError naming what is wrong); its calls' settings normalised."""
    def bad(what):
        return ValueError(f"load_plora: the PLoRA record of {where} is malformed: {what}")

    if not isinstance(record, dict):
        raise bad(f"expected a dict, got {type(record).__name__}")
    fmt = record.get("format")
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
        raise bad(f"'format' must be a positive int, got {fmt!r}")
    if fmt > RECORD_FORMAT:
        raise ValueError(f"load_plora: {where} was written by plora_kernels {record.get('package_version')} in record "
                         f"format {fmt}; this version reads format {RECORD_FORMAT} at most: upgrade plora_kernels")
    calls = record.get("calls")
    if not isinstance(calls, list) or not calls:
        raise bad("'calls' must be a non-empty list of apply_plora settings")
    out = []
    for i, call in enumerate(calls):
        if not isinstance(call, dict) or not set(RECORD_SETTINGS) <= set(call):
            raise bad(f"call {i + 1} must be a dict with the keys {list(RECORD_SETTINGS)}, got {call!r}")
        try:
            targets = call["target_modules"]
            module_matcher(targets)
            dtype = _dtype(call["adapter_dtype"])
            momentum = check_layer_args(call["r"], call["alpha"], call["momentum"], call["rounding"], dtype,
                                        call["lora_dropout"])
        except (TypeError, ValueError) as exc:
            raise bad(f"call {i + 1}: {exc}") from None
        out.append({**call, "target_modules": targets if targets is None or isinstance(targets, str)
                    else sorted(set(targets)), "r": int(call["r"]), "alpha": float(call["alpha"]),
                    "momentum": momentum, "lora_dropout": float(call["lora_dropout"])})
    return {**record, "calls": out}


def _dtype(name) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"adapter_dtype must be a floating-point dtype name or None, got {name!r}")
    return dtype


def _settings(call: dict) -> dict:
    return {key: call[key] for key in RECORD_SETTINGS}


def _compare_records(ours: dict, theirs: dict, where: str) -> None:
    """ValueError naming the first setting in which the model's record differs from the checkpoint's."""
    a, b = ours["calls"], theirs["calls"]
    if len(a) != len(b):
        raise ValueError(f"load_plora: {where} was saved from a model patched by {len(b)} apply_plora call(s), but "
                         f"this model was patched by {len(a)}: {_patch_hint()}")
    for i, (x, y) in enumerate(zip(a, b)):
        for key in RECORD_SETTINGS:
            if x[key] != y[key]:
                which = f" (apply_plora call {i + 1} of {len(a)})" if len(a) > 1 else ""
                raise ValueError(f"load_plora: {where} was saved from a model patched with {key}={y[key]!r}, but this "
                                 f"model has {key}={x[key]!r}{which}: {_patch_hint()}")


def _patch_hint() -> str:
    return ("patch it exactly as the run did, or pass the model unpatched (or its class) and load_plora patches it "
            "from the checkpoint's record")


def _expected_per_layer(calls: list[dict], names: list[str]) -> dict[str, dict]:
    """For each adapted layer of a checkpoint, the settings of the first recorded call whose target_modules match
    it (a later call leaves a patched layer alone)."""
    matchers = [module_matcher(call["target_modules"]) for call in calls]
    out = {}
    for name in names:
        for call, match in zip(calls, matchers):
            if match is None or match(name):
                out[name] = call
                break
    return out


# ---------------------------------------------------------------------------------------------- the plan
def _plan(model: nn.Module, ckpt: _Checkpoint) -> tuple[list[dict] | None, list[str]]:
    """Check that ``ckpt`` fits ``model`` (everything but the non-adapter tensors); returns (the calls to replay on
    the unpatched model, or None, and the names of the checkpoint's adapted layers). Changes nothing."""
    where = ckpt.where
    live = dict(plora_layers(model))
    saved = ckpt.adapter_layers()
    record = _check_record(ckpt.record, where) if ckpt.record is not None else None
    have = set(ckpt.keys())
    for name in saved:
        if _key(name, "lora_B") not in have:
            raise ValueError(f"load_plora: {where} has {_key(name, 'lora_A')} but not {_key(name, 'lora_B')}: it is "
                             "incomplete")
    if not saved:
        if record is not None:
            raise ValueError(f"load_plora: {where} records a PLoRA patch (config.{RECORD_KEY} / {CONFIG_FILE}) but "
                             "holds no adapters (no lora_A/lora_B): it was probably saved from a model loaded with a "
                             "plain from_pretrained, which dropped them. Load the checkpoint that model came from with "
                             "load_plora; or, for a plain model, delete the record")
        if live:
            raise ValueError(f"load_plora: {where} holds no PLoRA adapters (a merged or plain checkpoint), but this "
                             f"model has {len(live)} PLoRALinear layers; load it into the unpatched model (or its "
                             "class), then apply_plora to train on")
        return None, saved
    calls = None
    if not live:
        if record is None:
            raise ValueError(f"load_plora: {where} holds live PLoRA adapters (lora_A/lora_B of {len(saved)} layers, "
                             f"e.g. {saved[0]!r}) but no record of how they were made (config.{RECORD_KEY} in "
                             f"config.json, or {CONFIG_FILE}), and this model is not patched: loading it into a plain "
                             "model would drop them. Patch the model with the same apply_plora call(s) as the run, "
                             "then load_plora(model, path)")
        calls = record["calls"]
        planned = plan_calls(model, calls)  # ValueError for a call matching nothing
        layers = [name for names in planned for name in names]
        modules = dict(model.named_modules())
        shapes = {name: (modules[name].in_features, modules[name].out_features) for name in layers}
        per_layer = {name: call for names, call in zip(planned, calls) for name in names}
    else:
        layers = list(live)
        shapes = {name: (layer.in_features, layer.out_features) for name, layer in live.items()}
        per_layer = None
        if record is not None:
            ours = plora_record(model)
            if ours is not None and (ours.get("calls") or []):
                _compare_records(_check_record(ours, "this model"), record, where)
            per_layer = _expected_per_layer(record["calls"], saved)
    only_saved = [n for n in saved if n not in shapes]
    only_model = [n for n in layers if n not in set(saved)]
    if only_saved or only_model:
        raise ValueError(f"load_plora: {where} has adapters on other layers than this model (target_modules "
                         f"differ): only in the checkpoint: {only_saved[:6]}{'...' if len(only_saved) > 6 else ''}; "
                         f"only in the model: {only_model[:6]}{'...' if len(only_model) > 6 else ''}. "
                         + _patch_hint())
    adapters = ckpt.tensors([_key(n, k) for n in saved for k in ADAPTER_KEYS])
    for name in saved:
        a, b = adapters[_key(name, "lora_A")], adapters[_key(name, "lora_B")]
        n_in, n_out = shapes[name]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != n_in or b.shape[0] != n_out or a.shape[0] != b.shape[1]:
            raise ValueError(f"load_plora: {where}'s adapter of layer {name!r} has lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)}, which do not fit a layer of in={n_in}, out={n_out}")
        if a.dtype not in FLOAT_DTYPES or b.dtype != a.dtype:
            raise ValueError(f"load_plora: {where}'s adapter of layer {name!r} has dtypes {a.dtype} / {b.dtype}")
        r = a.shape[0]
        expected = per_layer.get(name) if per_layer is not None else None
        if expected is not None and r != expected["r"]:
            raise ValueError(f"load_plora: {where} records r={expected['r']} for layer {name!r} but holds an adapter "
                             f"of rank {r}: the checkpoint is inconsistent")
        if name in live:
            layer = live[name]
            if r != layer.r:
                raise ValueError(f"load_plora: {where} was saved from a model patched with r={r} (layer {name!r}), "
                                 f"but this model has r={layer.r}: {_patch_hint()}")
            if expected is not None and float(expected["alpha"]) != float(layer.alpha):
                raise ValueError(f"load_plora: {where} was saved from a model patched with alpha={expected['alpha']!r} "
                                 f"(layer {name!r}), but this model has alpha={layer.alpha!r}: {_patch_hint()}")
    return calls, saved


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})


@torch.no_grad()
def _replay(model: nn.Module, calls: list[dict]) -> None:
    """Patch ``model`` by the recorded calls. The fresh lora_A draws are overwritten by the checkpoint's, so they
    are made on a forked RNG: loading does not move torch's random state (a resumed run's dropout masks)."""
    with torch.random.fork_rng(devices=_cuda_devices(model)):
        for call in calls:
            kw = {"momentum": call["momentum"], "rounding": call["rounding"], "lora_dropout": call["lora_dropout"],
                  "adapter_dtype": _dtype(call["adapter_dtype"])}
            patch_model(model, call["target_modules"], call["r"], call["alpha"], kw, replay=True)


@torch.no_grad()
def _load_adapters(model: nn.Module, ckpt: _Checkpoint, saved: list[str]) -> None:
    live = dict(plora_layers(model))
    names = [_key(n, k) for n in saved for k in ADAPTER_KEYS]
    counts = [_key(n, "num_unloads") for n in saved]
    have = set(ckpt.keys())
    tensors = ckpt.tensors(names + [k for k in counts if k in have])
    for name in saved:
        layer = live[name]
        a = tensors[_key(name, "lora_A")]
        layer.adapters_to_(a.dtype)  # the checkpoint's adapter dtype: an exact copy
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(tensors[_key(name, "lora_B")])
        if _key(name, "num_unloads") in tensors:
            layer.num_unloads.copy_(tensors[_key(name, "num_unloads")])


def _check_full_state(model: nn.Module, ckpt: _Checkpoint, saved: list[str], calls) -> dict[str, torch.Tensor]:
    """Every tensor of the (patched-to-be) model has its entry in the checkpoint with the same shape, and the
    checkpoint has no other; a missing entry is allowed for a tensor tied to one that is there (an LM head tied to
    the embedding is saved once). Returns the checkpoint's non-adapter tensors."""
    own = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in own.items()}
    if calls is not None:  # the layers the replay will patch get their adapter entries
        for name in saved:
            for k in (*ADAPTER_KEYS, "num_unloads"):
                expected.setdefault(_key(name, k), None)
    keys = ckpt.keys()
    have = set(keys)
    adapter = {_key(n, k) for n in saved for k in (*ADAPTER_KEYS, "num_unloads")}
    unexpected = [k for k in keys if k not in expected]
    present_ptrs = {(own[k].device, own[k].data_ptr(), tuple(own[k].shape)) for k in own if k in have}
    missing = [k for k in expected if k not in have and k not in adapter and
               (k not in own or (own[k].device, own[k].data_ptr(), tuple(own[k].shape)) not in present_ptrs)]
    if unexpected or missing:
        raise ValueError(f"load_plora: {ckpt.where} does not fit this model: unexpected entries {unexpected[:6]}, "
                         f"missing entries {missing[:6]}; it is from another model")
    rest = ckpt.tensors([k for k in keys if k not in adapter])
    for k, t in rest.items():
        if expected[k] is not None and tuple(t.shape) != expected[k]:
            raise ValueError(f"load_plora: {ckpt.where}'s {k} has shape {tuple(t.shape)} but this model's has "
                             f"{expected[k]}: it is from another model")
    return rest


# --------------------------------------------------------------------------------------------------- the API
def load_plora(model_or_class, path, **from_pretrained_kwargs) -> nn.Module:
    """Load a checkpoint of a PLoRA-patched model exactly: the base, the patch, the live adapters.

    Args:
        model_or_class: a transformers model class (``LlamaForCausalLM``, ``AutoModelForCausalLM``): the model is
            built by ``model_or_class.from_pretrained(path, **from_pretrained_kwargs)``, in the checkpoint's dtype
            unless ``dtype`` says otherwise; or an ``nn.Module`` instance, whose tensors are overwritten in place
            (its dtypes kept; the adapters take the checkpoint's dtype). An instance may be unpatched (load_plora
            patches it from the record) or patched (the patch must be the checkpoint's).
        path: a checkpoint folder (``save_pretrained`` / :func:`save_plora` output, a Trainer ``checkpoint-N``;
            the record comes from ``config.json``'s ``"plora"`` entry or ``plora_config.json``); with an instance
            also a state-dict file (``torch.save(model.state_dict(), f)``, ``.safetensors``) or a state dict,
            which carry no record, so the instance must then be patched already.
        **from_pretrained_kwargs: for a class only.

    Returns the model, patched as the run was (the recorded ``apply_plora`` calls replayed), with every weight,
    adapter and unload count of the checkpoint: it computes what the saved model computed, bit for bit, and
    continues training as it would have (restore the optimizer, the :class:`PeriodicUnloader` and the RNG state
    as a resume does). Loading draws no random number from torch's generators.

    Raises ValueError, before the model changes, naming what differs: a model patched otherwise than the
    checkpoint (target_modules, r, alpha, momentum, rounding, lora_dropout, adapter_dtype; the number of
    apply_plora calls); a checkpoint with live adapters but no record, into an unpatched model; a checkpoint
    without adapters (merged or plain) into a patched model; a checkpoint from another model (missing, extra
    or misshapen entries). A checkpoint without adapters and record loads as a plain model.
    """
    if isinstance(model_or_class, type):
        return _load_into_class(model_or_class, path, from_pretrained_kwargs)
    if not isinstance(model_or_class, nn.Module):
        raise TypeError(f"load_plora: model_or_class must be a transformers model class or an nn.Module, got "
                        f"{type(model_or_class).__name__}")
    if from_pretrained_kwargs:
        raise TypeError(f"load_plora: keyword arguments {sorted(from_pretrained_kwargs)} go to from_pretrained, which "
                        "only a model class calls; this is a model instance")
    model = model_or_class
    if isinstance(model, PLoRALinear):
        raise TypeError("load_plora: model is itself a PLoRALinear; load a layer with layer.load_state_dict(...)")
    ckpt = _Checkpoint(path)
    calls, saved = _plan(model, ckpt)
    rest = _check_full_state(model, ckpt, saved, calls)
    # every check is done: change the model
    if calls is not None:
        _replay(model, calls)
    with torch.no_grad():
        own = model.state_dict(keep_vars=True)
        for k, t in rest.items():
            own[k].copy_(t)
    if saved:
        _load_adapters(model, ckpt, saved)
    return model


def check_checkpoint(model: nn.Module, path) -> None:
    """Raise the ValueError :func:`load_plora` would raise for ``model`` and the checkpoint at ``path`` because of
    the PLoRA patch (target_modules, r, alpha, momentum, rounding, lora_dropout, adapter_dtype; adapters without a
    record into an unpatched model; a checkpoint without adapters into a patched one), reading only the record and
    the adapters; changes nothing. For code that loads the weights itself, e.g. a Trainer resuming from a
    checkpoint into a model patched by the script."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"check_checkpoint: model must be an nn.Module, got {type(model).__name__}")
    _plan(model, _Checkpoint(path))


def _load_into_class(cls, path, kwargs: dict) -> nn.Module:
    if not callable(getattr(cls, "from_pretrained", None)):
        raise TypeError(f"load_plora: {cls.__name__} has no from_pretrained; pass a model instance instead")
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_dir():
        raise ValueError(f"load_plora: with a model class, path must be a local checkpoint folder, got {path!r}")
    if "output_loading_info" in kwargs:
        raise TypeError("load_plora: output_loading_info is not supported (load_plora checks the loading itself)")
    ckpt = _Checkpoint(path)
    saved = ckpt.adapter_layers()
    if bool(saved) != (ckpt.record is not None):
        _plan(nn.Module(), ckpt)  # raises: live adapters without a record, or a record without adapters
    if ckpt.record is not None:
        _check_record(ckpt.record, ckpt.where)
    kwargs = dict(kwargs)
    if not any(k in kwargs for k in ("dtype", "torch_dtype")) and _transformers_major() < 5:
        kwargs["torch_dtype"] = "auto"  # the checkpoint's dtype, as transformers >= 5 does by default
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the adapters as unexpected; they are loaded below
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    adapter = {_key(n, k) for n in saved for k in (*ADAPTER_KEYS, "num_unloads")}
    unexpected = sorted(set(info.get("unexpected_keys") or ()) - adapter)
    missing = sorted(set(info.get("missing_keys") or ()))
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or ()))
    if unexpected or missing or mismatched:
        raise ValueError(f"load_plora: {cls.__name__}.from_pretrained({str(path)!r}) did not load the checkpoint "
                         f"exactly: unexpected {unexpected[:6]}, missing {missing[:6]}, mismatched {mismatched[:6]}; "
                         "use the model class the checkpoint was saved from")
    if record_config(model) is not None:
        set_plora_record(model, None)  # from config.json: the replay below records the calls again
    if not saved:
        return model
    calls, saved = _plan(model, ckpt)
    _replay(model, calls)
    _load_adapters(model, ckpt, saved)
    return model


def _transformers_major() -> int:
    import transformers

    try:
        return int(transformers.__version__.split(".")[0])
    except ValueError:  # pragma: no cover
        return 5


def save_plora(model: nn.Module, path, **save_pretrained_kwargs) -> str:
    """Save ``model`` with its PLoRA record, for :func:`load_plora`; returns the folder.

    A transformers model is saved by ``model.save_pretrained(path, **save_pretrained_kwargs)``: the record is
    in its ``config.json`` (``model.save_pretrained`` alone does the same; so does every Trainer checkpoint). Any
    other module: its ``state_dict()`` to ``plora_model.pt`` and the record to ``plora_config.json``. Layers no
    :func:`apply_plora` call recorded (``from_peft``, built by hand) are recorded first, as they are now; a model
    without PLoRALinear layers is saved without a record (a stale one, e.g. in a config loaded from a checkpoint, is
    removed)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_plora: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TypeError(f"save_plora: path must be a folder path, got {path!r}")
    transformers_model = record_config(model) is not None
    if save_pretrained_kwargs and not transformers_model:
        raise TypeError(f"save_plora: keyword arguments {sorted(save_pretrained_kwargs)} go to save_pretrained, which "
                        f"{type(model).__name__} does not have")
    layers = list(plora_layers(model))
    if not layers:
        set_plora_record(model, None)
    elif plora_record(model) is None:
        set_plora_record(model, snapshot_record(model))
    folder = Path(path)
    if transformers_model:
        model.save_pretrained(str(folder), **save_pretrained_kwargs)
        return str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)
    record = plora_record(model)
    config = folder / CONFIG_FILE
    if record is not None:
        config.write_text(json.dumps(record, indent=1) + "\n")
    elif config.exists():
        config.unlink()
    return str(folder)
