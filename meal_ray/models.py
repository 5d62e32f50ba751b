"""Students, teachers and the MEAL V2 discriminator, built on timm.

Weights come from a timm/HF-hub name (``pretrained=True``, needs internet), a local weights
file (timm's ``pretrained_cfg_overlay=dict(file=...)``), or a meal-ray export directory
(``model.safetensors`` + ``config.json``, loadable by timm as ``local-dir:DIR``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import timm
import torch
from torch import nn

from meal_ray.errors import ClassCountMismatchError, ModelNotFoundError, suggest

#: Discriminator hidden widths never go below this, so small class counts (C=10) still work.
DISCRIMINATOR_MIN_WIDTH = 8


def check_model_name(name: str) -> None:
    """Raise ModelNotFoundError (with close names) unless timm knows ``name`` (hub and local-dir names pass)."""
    if name.startswith(("hf-hub:", "local-dir:")):
        return
    if not timm.is_model(name):
        arch = name.split(".")[0]
        raise ModelNotFoundError(
            f"unknown timm model {name!r}.{suggest(arch, timm.list_models())} "
            "See `timm.list_models('pattern*')` for valid names."
        )


def is_export_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def read_export_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def create_model(name: str, num_classes: int = 1000, in_chans: int = 3, pretrained: bool = False,
                 weights: Optional[str] = None, data_config: Optional[dict] = None, **kwargs) -> nn.Module:
    """Create a timm model, optionally with weights; ``data_config`` sets its pretrained_cfg preprocessing.

    ``weights`` may be a meal-ray export directory (its class count and channels must match)
    or a local weights file in any format timm loads (the classifier is re-initialized when
    the class count differs, as timm does for pretrained weights).
    """
    check_model_name(name)
    if weights and is_export_dir(weights):
        _check_export_fits(weights, name, num_classes, in_chans)
        model = _load_local_dir(weights, **kwargs)
    elif weights:
        path = Path(weights)
        if not path.is_file():
            raise ModelNotFoundError(
                f"weights {weights!r} not found: give a meal-ray export directory (model.safetensors + "
                "config.json) or a weights file (.safetensors/.pth/.bin)."
            )
        check_weights_readable(path)
        overlay = dict(file=str(path.resolve()), num_classes=num_classes)
        try:  # keep the file's classifier when it has num_classes outputs ...
            model = timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_chans,
                                      pretrained_cfg_overlay=overlay, **kwargs)
        except RuntimeError:  # ... else load the backbone and re-initialize the classifier, as timm does
            overlay.pop("num_classes")
            try:
                model = timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_chans,
                                          pretrained_cfg_overlay=overlay, **kwargs)
            except RuntimeError as e:
                raise ModelNotFoundError(f"weights file {weights} does not fit model {name!r}: {e}") from None
    else:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if data_config:
        set_data_config(model, data_config)
    return model


def _check_export_fits(weights, name: str, num_classes: Optional[int], in_chans: Optional[int]) -> None:
    cfg = read_export_config(weights)
    got_classes = cfg.get("num_classes")
    got_chans = cfg.get("model_args", {}).get("in_chans", cfg.get("pretrained_cfg", {}).get("input_size", [3])[0])
    if (num_classes is not None and got_classes != num_classes) or (in_chans is not None and got_chans != in_chans):
        raise ClassCountMismatchError(
            f"weights {weights} are for {got_classes} classes and {got_chans} input channels, but "
            f"{num_classes} classes and {in_chans} channels were asked for; set num_classes={got_classes} "
            f"and use data with {got_chans} channels, or use other weights."
        )
    if cfg.get("architecture") != name.split(".")[0]:
        raise ModelNotFoundError(
            f"weights {weights} hold a {cfg.get('architecture')!r} model, not {name!r}; "
            f"set the model name to {cfg.get('architecture')!r}."
        )


def check_weights_fit(name: str, weights: str | Path, num_classes: Optional[int] = None,
                      in_chans: Optional[int] = None) -> None:
    """Before Ray starts: weights that exist must read and be for ``name`` (an export's config.json names its
    architecture; a weights file's tensor names and shapes are compared with the model built on the meta device, which
    costs no memory). The classifier may differ (timm re-initializes it); anything else is a clear error here rather
    than a worker's load traceback."""
    path = Path(weights)
    if is_export_dir(path):
        check_weights_readable(path / "model.safetensors")
        _check_export_fits(path, name, num_classes, in_chans)
        return
    check_weights_readable(path)
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=num_classes or 1000, in_chans=in_chans or 3)
    head = model.pretrained_cfg.get("classifier") or ()
    head = (head,) if isinstance(head, str) else tuple(head)  # its name prefix(es); "x".startswith(()) is False
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(head)}
    try:  # .pth files load with weights_only=True: a pickled object in one is refused here
        shapes = _tensor_shapes(path)
    except Exception as e:  # noqa: BLE001 - safetensors, zip, unpickling: each raises its own type
        raise _corrupt(path, e) from None
    got = {k.removeprefix("module."): v for k, v in shapes.items()}
    got = {k: v for k, v in got.items() if not k.startswith(head)}
    wrong = sorted(k for k in expected if k in got and got[k] != expected[k])
    missing, unknown = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unknown or wrong:
        detail = "; ".join(f"{what}: {len(keys)} (e.g. {keys[0]})" for what, keys in (
            ("tensors the model has and the file lacks", missing), ("tensors in the file the model lacks", unknown),
            ("tensors of another shape", wrong)) if keys)
        raise ModelNotFoundError(f"weights file {path} does not fit model {name!r} ({detail}); give the architecture "
                                 "the weights were trained as, or other weights.")


def _tensor_shapes(path: Path) -> dict:
    """Tensor names and shapes of a weights file, reading no tensor data where the format allows."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for key in ("state_dict", "model", "state_dict_ema"):  # checkpoints that wrap the state dict (timm reads these)
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def set_data_config(model: nn.Module, data_config: dict) -> None:
    """Record preprocessing (input_size, mean, std, interpolation, crop_pct) in the model's pretrained_cfg."""
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    for key, value in data_config.items():
        cfg[key] = tuple(value) if isinstance(value, list) else value
    model.pretrained_cfg = cfg


def model_data_config(model: nn.Module) -> dict:
    """timm's resolved data config (input_size, mean, std, interpolation, crop_pct) for ``model``."""
    from timm.data import resolve_data_config

    return resolve_data_config(model=model)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def export_model(model: nn.Module, out_dir: str | Path, data_config: dict,
                 label_names: Optional[Sequence[str]] = None) -> Path:
    """Write ``model.safetensors`` + timm ``config.json`` to ``out_dir`` atomically (temp dir + rename)."""
    from timm.models import save_for_hf

    model = getattr(model, "module", model)  # unwrap DDP
    if any(not t.is_contiguous() for t in model.state_dict().values()):  # channels-last: safetensors wants dense rows
        model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model_config = {"label_names": list(label_names)} if label_names else None
        save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True,
                    data_config={k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()})
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_export(path: str | Path) -> nn.Module:
    """Load a meal-ray export with plain timm (``local-dir:``) in eval mode."""
    if not is_export_dir(path):
        raise ModelNotFoundError(
            f"{path} is not a meal-ray model export (expected model.safetensors and config.json there)."
        )
    return _load_local_dir(path).eval()


def _corrupt(path, e: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(f"weights {str(path)!r} cannot be read ({type(e).__name__}: {str(e)[:160]}): the file "
                              "is truncated or corrupt, or not a weights file. Export or download it again.")


def _load_local_dir(path, **kwargs) -> nn.Module:
    """timm's ``local-dir:`` load of an export, with a corrupt file named instead of a loader traceback."""
    check_weights_readable(Path(path) / "model.safetensors")
    return timm.create_model(f"local-dir:{Path(path).resolve()}", pretrained=True, **kwargs)


def check_weights_readable(path: Path) -> None:
    """Open a weights file's header/archive (cheap) so a truncated or corrupt one fails with a clear message."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                f.keys()
        else:
            import zipfile

            with open(path, "rb") as f:
                zipped = f.read(2) == b"PK"
            if zipped:  # torch.save's format: the archive's directory must be intact (a cut file loses it)
                with zipfile.ZipFile(path) as z:
                    z.namelist()
    except Exception as e:  # noqa: BLE001 - safetensors, zip, pickle: each raises its own type
        raise _corrupt(path, e) from None


def discriminator_widths(num_classes: int, floor: int = DISCRIMINATOR_MIN_WIDTH) -> tuple[int, int]:
    """Hidden widths C//8 and (C//8)//8, each floored at ``floor`` (1000 -> 125, 15; 10 -> 8, 8)."""
    h1 = max(num_classes // 8, floor)
    return h1, max(h1 // 8, floor)


class Discriminator(nn.Module):
    """MEAL V2 discriminator on logits: C -> C//8 -> (C//8)//8 -> 2, ReLU after every layer (authors' code)."""

    def __init__(self, num_classes: int, floor: int = DISCRIMINATOR_MIN_WIDTH):
        super().__init__()
        h1, h2 = discriminator_widths(num_classes, floor)
        self.num_classes = num_classes
        self.net = nn.Sequential(
            nn.Linear(num_classes, h1), nn.ReLU(),
            nn.Linear(h1, h2), nn.ReLU(),
            nn.Linear(h2, 2), nn.ReLU(),
        )

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.net(logits)
