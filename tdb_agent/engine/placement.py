"""Models spread over several devices: Hugging Face accelerate device maps.

`Engine.load(..., device_map="auto" | "balanced" | {module: device})` loads through
`from_pretrained(device_map=...)`: accelerate puts each block on a GPU, the CPU, or
offloads its weights ("cpu" next to GPUs, "disk" with an offload folder: the weights live
there and are brought to the execution device for each forward). The engine then runs its
own loop over the dispatched modules; the rules that keep every operation unchanged:

* the residual stream moves to each block's execution device at the block boundary, so
  hooks on a block's sites see tensors on that block's device;
* what the engine hands out (logits, final residual stream, captured activations) is on
  the engine's home device (where the token ids go: the embedding's execution device),
  moved with `.to`, which autograd follows, so gradients still flow to the blocks;
* weights are read through `param()`, which materialises offloaded (meta) parameters.

Before loading, `plan()` estimates the model's size from its config (no weights read) and
refuses, with the estimate, a request that would not fit instead of an out-of-memory crash.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field

from tdb_agent.errors import TdbError

log = logging.getLogger(__name__)

GiB = 1024 ** 3
AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


class PlacementError(TdbError):
    """A device map, memory cap or offload request that cannot be honoured."""


class DoesNotFit(PlacementError):
    """The model would not fit on the requested devices (the message has the estimate)."""


class DeviceUsage(BaseModel):
    device: str = Field(description="cuda:0, cpu, disk, ...")
    modules: int = Field(description="modules of the device map placed there")
    param_bytes: int = Field(description="bytes of parameters placed there")
    offloaded: bool = Field(description="weights kept here but computed on another device (accelerate offload)")
    allocated_bytes: int | None = Field(None, description="CUDA memory allocated by this process on the device")
    total_bytes: int | None = Field(None, description="the device's total memory (CUDA)")


class Placement(BaseModel):
    device_map: dict[str, str] | None = Field(None, description="module -> device; None: the whole model on one device")
    home_device: str = Field(description="where inputs go and where results and captured activations are returned")
    layer_devices: list[str] = Field(description="execution device of each block")
    devices: list[DeviceUsage]


def parse_device_map(text: str | Mapping | None) -> str | dict[str, str] | None:
    """CLI value -> accelerate's device_map: a strategy name, or a JSON object (inline or a
    file path) mapping module names to devices ("cpu", "disk", 0, "cuda:1")."""
    if text is None or isinstance(text, Mapping):
        return dict(text) if text is not None else None
    text = text.strip()
    if text in AUTO_MAPS:
        return text
    if not text.startswith("{"):
        from pathlib import Path
        if Path(text).is_file():
            text = Path(text).read_text()
        else:
            raise PlacementError(f"--device-map must be one of {', '.join(AUTO_MAPS)} or a JSON object "
                             f"(or a file holding one) mapping module names to devices, not {text!r}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlacementError(f"--device-map JSON is invalid: {e}") from None
    if not isinstance(value, dict):
        raise PlacementError("--device-map JSON must be an object {module name: device}")
    return value


def parse_max_memory(text: str | Mapping | None) -> dict | None:
    """'0=70GiB,1=70GiB,cpu=200GiB' -> {0: '70GiB', 1: '70GiB', 'cpu': '200GiB'} (accelerate's form)."""
    if text is None or isinstance(text, Mapping):
        return dict(text) if text is not None else None
    if text.strip().startswith("{"):  # JSON, as discover passes a dict on to `serve`
        return {int(k) if k.isascii() and k.isdigit() else k: v for k, v in json.loads(text).items()}
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise PlacementError(f"--max-memory entries are DEVICE=SIZE (e.g. 0=70GiB,cpu=100GiB), not {part!r}")
        dev, size = (s.strip() for s in part.split("=", 1))
        out[int(dev) if dev.isascii() and dev.isdigit() else dev] = (
            int(size) if size.isascii() and size.isdigit() else size)
    return out


def _bytes(size) -> int:
    from accelerate.utils import convert_file_size_to_int
    return convert_file_size_to_int(size) if isinstance(size, str) else int(size)


def _fmt(n: float) -> str:
    if n >= GiB / 10:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 1024 ** 2:.1f} MiB" if n >= 1024 ** 2 / 10 else f"{n / 1024:.0f} KiB"


def _dev_name(d) -> str:
    return f"cuda:{d}" if isinstance(d, int) else str(d)


def plan(src: str, dtype: torch.dtype, device_map, max_memory: dict | None, offload_folder: str | None,
         single_device: torch.device | None = None, local_files_only: bool = True):
    """The device map to load with (accelerate's strategies resolved here, so the check and
    the load agree), after checking that it fits. Builds the model on the meta device from
    its config: no weight is read."""
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes, get_balanced_memory, get_max_memory, infer_auto_device_map
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src, local_files_only=local_files_only)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype)
    meta.tie_weights()
    sizes = compute_module_sizes(meta, dtype=dtype)
    total = sizes[""]
    if device_map is None:  # one device: refuse what cannot fit it
        free = _free_bytes(single_device)
        if free is not None and total > free:
            raise DoesNotFit(
                f"the model needs about {_fmt(total)} of parameters in {str(dtype).removeprefix('torch.')} but "
                f"{single_device} has {_fmt(free)} free; spread it with --device-map auto (GPUs, then CPU, then "
                "--offload-folder), or load it in a smaller --dtype")
        return None
    if isinstance(device_map, str):
        no_split = getattr(meta, "_no_split_modules", None) or []
        no_split = list(no_split) if not isinstance(no_split, str) else [no_split]
        mem = {k: _bytes(v) for k, v in (max_memory or get_max_memory()).items()}
        if device_map != "sequential" and torch.cuda.device_count() > 1:  # as transformers: auto = balanced
            mem = get_balanced_memory(meta, max_memory=mem, no_split_module_classes=no_split, dtype=dtype,
                                      low_zero=device_map == "balanced_low_0")
        dm = infer_auto_device_map(meta, max_memory=mem, no_split_module_classes=no_split, dtype=dtype)
        if "disk" in dm.values() and offload_folder is None:
            room = ", ".join(f"{_dev_name(k)} {_fmt(v)}" for k, v in mem.items())
            raise DoesNotFit(
                f"the model needs about {_fmt(total)} of parameters in {str(dtype).removeprefix('torch.')}; the "
                f"devices offer {room}, so {_fmt(sum(sizes[m] for m, d in dm.items() if d == 'disk'))} would go to "
                "disk: pass --offload-folder DIR to offload it there, add devices, raise --max-memory, or use a "
                "smaller --dtype")
    else:
        dm = dict(device_map)
        names = {n for n, _ in meta.named_modules()}
        unknown = [m for m in dm if m not in names]
        if unknown:
            tops = sorted(n for n in names if n and n.count(".") <= 2)[:12]
            raise PlacementError(f"device map names modules the model does not have: {unknown}; "
                                 f"modules look like {tops}")
        if "disk" in dm.values() and offload_folder is None:
            raise DoesNotFit("the device map puts modules on 'disk': pass --offload-folder DIR")
        if max_memory:
            for dev, limit in max_memory.items():
                need = sum(sizes.get(m, 0) for m, d in dm.items() if _dev_name(d) == _dev_name(dev))
                if need > _bytes(limit):
                    raise DoesNotFit(f"the device map puts about {_fmt(need)} of parameters on {_dev_name(dev)}, "
                                     f"over its --max-memory {limit}")
    log.info("device map for %s (%s): %s", src, _fmt(total), dm)
    return dm


def _free_bytes(device: torch.device | None) -> int | None:
    if device is None:
        return None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            import psutil
        except ImportError:
            return None
        return int(psutil.virtual_memory().available)
    return None


def param(module: torch.nn.Module, name: str = "weight") -> torch.Tensor | None:
    """A parameter's real tensor, also where accelerate offloaded it (meta outside forward)."""
    t = getattr(module, name, None)
    if t is None or t.device.type != "meta":
        return t
    from accelerate.utils import align_module_device

    with align_module_device(module):  # loads it from the offload store; the tensor we keep stays valid
        return getattr(module, name)


def execution_device(module: torch.nn.Module, default: torch.device) -> torch.device:
    """Where a module computes: accelerate's hook on it or its first hooked submodule,
    else its first non-meta parameter."""
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return default


def to_device(obj, device: torch.device):
    """Tensors (also inside tuples/lists/dicts) moved to `device`; no-op where they are."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@dataclass(frozen=True)
class Devices:
    """Where the engine's loop computes: the home device (token ids in; logits, residual
    streams and captured activations out), each block's execution device and the final
    norm's. One device for an ordinary model; a model spread by a device map (`dispatched`)
    crosses devices at block boundaries. Every move is a no-op where the tensor already is."""

    home: torch.device
    layers: tuple[torch.device, ...]
    out: torch.device
    dispatched: bool = False

    @classmethod
    def of(cls, model: torch.nn.Module, embed: torch.nn.Module, blocks: list[torch.nn.Module],
           final_norm: torch.nn.Module) -> "Devices":
        """The devices of a loaded model: its parameters' device, or where accelerate runs
        each part (the home device is the embedding's)."""
        if not getattr(model, "hf_device_map", None):
            dev = next(model.parameters()).device
            return cls(dev, (dev,) * len(blocks), dev)
        home = execution_device(embed, torch.device("cpu"))
        return cls(home, tuple(execution_device(b, home) for b in blocks), execution_device(final_norm, home),
                   dispatched=True)

    def to_home(self, obj):
        return to_device(obj, self.home)

    def to_out(self, obj):
        """To the final norm's device, where the logits are computed."""
        return to_device(obj, self.out)

    def entering(self, block_kwargs: dict) -> Callable[[int, torch.Tensor], tuple[torch.Tensor, dict]]:
        """enter(layer, x) -> (x, block kwargs) on that block's device; the kwargs are moved
        once per device."""
        moved: dict[torch.device, dict] = {}

        def enter(layer: int, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
            dev = self.layers[layer]
            if dev not in moved:
                moved[dev] = to_device(block_kwargs, dev)
            return to_device(x, dev), moved[dev]
        return enter


def placement(model: torch.nn.Module, home: torch.device, layer_devices: list[torch.device]) -> Placement:
    """Placement and memory per device, for model_info."""
    dm = getattr(model, "hf_device_map", None)
    usage: dict[str, DeviceUsage] = {}
    if dm:
        sizes: dict[str, int] = {}
        for name, p in model.named_parameters():
            sizes[name] = p.numel() * p.element_size()
        exec_devices = {str(d) for d in layer_devices} | {str(home)}
        for mod, dev in dm.items():
            d = _dev_name(dev)
            pre = mod + "." if mod else ""
            u = usage.setdefault(d, DeviceUsage(device=d, modules=0, param_bytes=0,
                                                offloaded=d == "disk" or (d == "cpu" and d not in exec_devices)))
            u.modules += 1
            u.param_bytes += sum(v for k, v in sizes.items() if k.startswith(pre) or k == mod)
    else:
        n = sum(p.numel() * p.element_size() for p in model.parameters())
        usage[str(home)] = DeviceUsage(device=str(home), modules=1, param_bytes=n, offloaded=False)
    for u in usage.values():
        if u.device.startswith("cuda") and torch.cuda.is_available():
            idx = torch.device(u.device).index or 0
            u.allocated_bytes = int(torch.cuda.memory_allocated(idx))
            u.total_bytes = int(torch.cuda.get_device_properties(idx).total_memory)
    devmap = {k: _dev_name(v) for k, v in dm.items()} if dm else None
    return Placement(device_map=devmap, home_device=str(home), layer_devices=[str(d) for d in layer_devices],
                     devices=sorted(usage.values(), key=lambda u: _order(u.device)))


def _order(dev: str):
    m = re.match(r"cuda:(\d+)", dev)
    return (0, int(m.group(1))) if m else (1, dev)
