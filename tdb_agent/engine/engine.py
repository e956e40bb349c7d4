"""The model engine: a Hugging Face causal LM with named hook sites, run by our own loop.

Why our own loop instead of `model(input_ids)`: it can start at any layer from a cached
residual stream, reuse cached keys/values of a prompt prefix, stop early, and project only
the positions and vocabulary entries a metric needs. The blocks themselves are the model's
own modules, so numbers match a plain `transformers` forward (tested).

Hook sites (TransformerLens names, shapes [batch, pos, ...]):

    hook_embed, hook_pos_embed (GPT-2)                      [b, s, d_model]
    blocks.{l}.hook_resid_pre / hook_resid_mid (sequential blocks) / hook_resid_post
    blocks.{l}.attn.hook_q / hook_k / hook_v / hook_z       [b, s, heads, d_head]
    blocks.{l}.attn.hook_attn_scores / hook_pattern          [b, heads, q_pos, k_pos]
    blocks.{l}.hook_attn_out / hook_mlp_out                  [b, s, d_model]
        (what the block writes into the residual stream: after the post-norm in Gemma-2/3, OLMo-2)
    blocks.{l}.mlp.hook_pre / hook_post                      [b, s, d_mlp]
    hook_resid_final, ln_final.hook_scale [b, s, 1], ln_final.hook_normalized, hook_logits

A hook is `fn(tensor, site) -> tensor | None` (None keeps the tensor); what it returns
flows on, at every site but ln_final.hook_scale (read only): engine/sites.py says where
each change goes (resid_mid: into the MLP and into resid_post = resid_mid + mlp_out).
Hooks live only inside `with engine.hooks({...}):`; they are removed on exit, also after
an exception.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from tdb_agent.engine import attention
from tdb_agent.engine.activations import fuse_gelu
from tdb_agent.engine.adapters import Adapter, adapter_for, check_checkpoint
from tdb_agent.engine.norms import apply_norm, norm_eps, norm_scale
from tdb_agent.engine.placement import Devices, Placement, param, parse_device_map, parse_max_memory, plan, \
    placement, to_device
from tdb_agent.engine.sae import SAESet
from tdb_agent.engine.sites import install_hook
from tdb_agent.engine.precision import cast_block_inputs, describe
from tdb_agent.engine.spec import ModelSpec
from tdb_agent.engine.tokens import with_bos
from tdb_agent.engine.weights import load_weights
from tdb_agent.errors import ModelNotFound, PromptTooLong, TdbError, TokenizationError, UnknownSite

log = logging.getLogger(__name__)

HookFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = ASSETS / "tdb-tiny"
UNEMBED_CHUNK = 32768  # vocabulary rows upcast at a time
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: sites a hook may read but not change (engine/sites.py)
READ_ONLY_SITES = frozenset({"ln_final.hook_scale"})


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (the caller has what it needs)."""


@dataclass
class HookState:
    """The hooks active right now; the attention function reads it on every call."""

    hooks: dict[str, list[HookFn]] = field(default_factory=dict)
    prefix_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def apply(self, site: str, x: torch.Tensor) -> torch.Tensor:
        for fn in self.hooks.get(site, ()):
            out = fn(x, site)
            if out is not None:
                if site in READ_ONLY_SITES:  # nothing reads it back: a change would be lost silently
                    raise TdbError(f"{site} is read only (the final norm computes its own scale); change "
                                   "hook_resid_final or ln_final.hook_normalized instead")
                x = out if out.device == x.device else out.to(x.device)  # the site stays on its device
        return x

    def has_attention_hooks(self, layer: int) -> bool:
        prefix = f"blocks.{layer}.attn."
        return any(prefix + s in self.hooks for s in attention.INTERNAL_SITES)

    def has_pattern_hooks(self, layer: int) -> bool:
        """Scores or pattern hooked: the attention must be computed explicitly."""
        prefix = f"blocks.{layer}.attn."
        return prefix + "hook_attn_scores" in self.hooks or prefix + "hook_pattern" in self.hooks


@dataclass
class ForwardOutput:
    logits: torch.Tensor | None  # [b, n_positions, n_vocab or len(logit_ids)]
    resid_final: torch.Tensor | None  # final residual stream (before the final norm) [b, s, d]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _load_tokenizer(src: str, folder: Path | None, allow_download: bool):
    """AutoTokenizer, except that a folder declaring the generic fast tokenizer gets it:
    AutoTokenizer would otherwise pick the family's own class (e.g. Qwen2's) and rebuild
    the vocabulary from files that are not there."""
    if folder is not None and (folder / "tokenizer.json").exists():
        cfg_file = folder / "tokenizer_config.json"
        declared = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.exists() else None
        if declared in ("PreTrainedTokenizerFast", "TokenizersBackend"):
            return PreTrainedTokenizerFast.from_pretrained(src)
    return AutoTokenizer.from_pretrained(src, local_files_only=not allow_download)



def _transformers_own(fn) -> bool:
    """transformers 5.x installs inert output-capturing hooks the first time a model is called
    with output_hidden_states/attentions (they act only inside its own collector, never in the
    engine's loop); they are the model's, not ours, and stay."""
    return getattr(fn, "__module__", "") == "transformers.utils.output_capturing"

class Engine:
    def __init__(self, model, tokenizer, name: str = "model"):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)  # gradients are taken w.r.t. activations only
        self.tokenizer = tokenizer
        self.name = name
        self.notes: list[str] = fuse_gelu(self.model)  # before the module sites are taken (engine/activations.py)
        self.adapter: Adapter = adapter_for(model)
        self.spec: ModelSpec = self.adapter.spec()
        self.lock = threading.RLock()
        self._state = HookState()
        self.saes = SAESet()  # sparse autoencoders attached to this model (engine/sae.py)
        self.transcoders = None  # a TranscoderSet replacing the MLPs (engine/transcoder.py)
        self.model.set_attn_implementation(attention.NAME)
        for layer in range(self.spec.n_layers):
            mod = self.adapter.attn(layer)
            mod._tdb_layer = layer
            mod._tdb_state = self._state
        self._module_sites = self.adapter.module_sites(self.spec.n_layers)
        # half precision: a float32 residual stream, blocks cast their inputs (engine/precision.py)
        self._cast_handles = cast_block_inputs(self.adapter.blocks(), self.dtype)
        # a dispatched model (accelerate device map) spans devices: the loop moves the
        # residual stream between blocks and hands results out on the home device
        self.devices = Devices.of(model, next(iter(self.adapter.embed_modules().values())), self.adapter.blocks(),
                                  self.adapter.final_norm())
        if self.devices.dispatched:
            self.adapter.home = self.devices.home
        self._computed_sites = {"hook_resid_final", "ln_final.hook_scale", "ln_final.hook_normalized",
                                "hook_logits"} | {
            f"blocks.{l}.attn.{s}" for l in range(self.spec.n_layers) for s in attention.INTERNAL_SITES}

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model: str | Path | None = None, device: str = "auto", dtype: str = "float32",
             allow_download: bool = False, device_map: str | dict | None = None,
             max_memory: str | dict | None = None, offload_folder: str | Path | None = None) -> "Engine":
        """Load a causal LM and its tokenizer from a local folder, or from the hub when
        `allow_download` (never on the default path).

        device_map: spread the model over devices with accelerate ("auto", "balanced", or
        {module: device} where device is a GPU index, "cpu" or "disk"); then `device` is
        ignored. max_memory ({0: "70GiB", "cpu": "100GiB"} or "0=70GiB,cpu=100GiB") caps
        each device; offload_folder holds weights mapped to "disk". A model that would not
        fit raises `DoesNotFit` with the estimate before any weight is read. Weights come from
        model.safetensors where it exists; a .bin only through the weights-only unpickler
        (engine/weights.py: anything else is refused with `UnsafeCheckpoint`)."""
        path = Path(model) if model is not None else DEFAULT_MODEL
        local = path.exists()
        if not local and not allow_download:
            raise ModelNotFound(
                f"model {str(model)!r} is not a local folder; pass allow_download=True "
                "(CLI: --allow-download) to fetch it from the Hugging Face hub")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        src = str(path) if local else str(model)
        dev = resolve_device(device)
        hf_logging.disable_progress_bar()  # stdout/stderr stay clean (stdio MCP transport)
        hf_logging.set_verbosity_error()
        check_checkpoint(src, local, allow_download)  # an unsupported family: refused before any weight
        tok = _load_tokenizer(src, path if local else None, allow_download)
        device_map, max_memory = parse_device_map(device_map), parse_max_memory(max_memory)
        dm = plan(src, DTYPES[dtype], device_map, max_memory, str(offload_folder) if offload_folder else None,
                  single_device=dev, local_files_only=not allow_download)
        weights = dict(dtype=DTYPES[dtype], local_files_only=not allow_download)
        if dm is None:
            mdl = load_weights(src, path if local else None, **weights).to(dev)
        else:
            mdl = load_weights(src, path if local else None, **weights, device_map=dm, offload_folder=offload_folder)
        log.info("loaded %s on %s (%s)", src, dev if dm is None else dm, dtype)
        return cls(mdl, tok, name=path.name if local else str(model))

    @property
    def device(self) -> torch.device:
        """The home device: inputs go here; results and captured activations come back here."""
        return self.devices.home

    @property
    def dispatched(self) -> bool:
        """Spread over devices by an accelerate device map."""
        return self.devices.dispatched

    def layer_device(self, layer: int) -> torch.device:
        """Where block `layer` computes (its hook sites' tensors live there)."""
        return self.devices.layers[layer]

    def placement(self) -> Placement:
        """Device map, execution device of each block, parameter bytes per device."""
        return placement(self.model, self.device, list(self.devices.layers))

    def param(self, module: torch.nn.Module, name: str = "weight") -> torch.Tensor | None:
        """A weight of `module` on the home device (materialised if accelerate offloaded it)."""
        t = param(module, name)
        return t if t is None or t.device == self.device else t.to(self.device)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ tokens
    def to_tokens(self, text: str, prepend_bos: bool = True, truncate: bool = False) -> torch.Tensor:
        """Token ids [1, s], BOS first where the tokenizer has one (as the bundled model was
        trained, and as TransformerLens does by default). Longer than the context: an error,
        or with `truncate` (reference text, corpora) the first n_ctx tokens."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if prepend_bos:  # a tokenizer without a BOS token (Qwen2) gets none
            ids = with_bos(self.tokenizer, ids)
        if not ids:
            raise TokenizationError("the prompt is empty")
        if truncate:
            ids = ids[: self.spec.n_ctx]
        if len(ids) > self.spec.n_ctx:
            raise PromptTooLong(f"the prompt is {len(ids)} tokens; the model's context is {self.spec.n_ctx}")
        return torch.tensor([ids], device=self.device)

    def str_tokens(self, ids: torch.Tensor | Sequence[int]) -> list[str]:
        ids = ids.flatten().tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return [self.tokenizer.decode([i]) for i in ids]

    def token_id(self, word: str) -> int:
        """The id of a single-token word; a clear error says how it tokenizes otherwise."""
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 and not word.startswith(" "):
            spaced = self.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            if len(spaced) == 1:
                ids = spaced
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([i]) for i in ids]
            raise TokenizationError(f"{word!r} must be one token but tokenizes as {pieces} (ids {ids})")
        unk = self.tokenizer.unk_token_id
        if unk is not None and ids[0] == unk and word != self.tokenizer.unk_token:
            raise TokenizationError(f"{word!r} is not in the model's vocabulary (it tokenizes as the "
                                    "unknown token)")
        return ids[0]

    # ------------------------------------------------------------------ hooks
    def site_names(self) -> list[str]:
        return sorted(set(self._module_sites) | self._computed_sites)

    def check_site(self, site: str) -> None:
        if site not in self._module_sites and site not in self._computed_sites:
            if self.spec.parallel_residual and site.startswith("blocks.") and site.endswith(".hook_resid_mid"):
                raise UnknownSite(f"{site!r} does not exist in {self.spec.family}: its blocks run attention and the "
                                  "MLP in parallel on the same input, so there is no residual stream between "
                                  "them; hook blocks.{l}.hook_resid_pre (their shared input), hook_attn_out or "
                                  "hook_mlp_out")
            close = get_close_matches(site, self.site_names(), n=3)
            raise UnknownSite(f"unknown hook site {site!r}" + (f"; did you mean {close}?" if close else ""))

    @contextmanager
    def hooks(self, mapping: dict[str, HookFn | list[HookFn]] | None = None,
              prefix_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Iterator[None]:
        """Install hooks (and cached prefix keys/values) for the duration of the block."""
        mapping = mapping or {}
        for site in mapping:
            self.check_site(site)
        with self.lock:
            handles = []
            added: list[tuple[str, HookFn]] = []
            old_prefix = self._state.prefix_kv
            try:
                self._state.prefix_kv = prefix_kv if prefix_kv is not None else old_prefix
                for site, fns in mapping.items():
                    fns = fns if isinstance(fns, list) else [fns]
                    new_site = site not in self._state.hooks
                    for fn in fns:
                        self._state.hooks.setdefault(site, []).append(fn)
                        added.append((site, fn))
                    if new_site and site in self._module_sites:
                        handles.append(self._install(site))
                yield
            finally:
                for h in handles:
                    h.remove()
                for site, fn in added:
                    lst = self._state.hooks.get(site, [])
                    if fn in lst:
                        lst.remove(fn)
                    if not lst:
                        self._state.hooks.pop(site, None)
                self._state.prefix_kv = old_prefix

    def _install(self, site: str):
        module, where = self._module_sites[site]
        return install_hook(module, where, site, self._state.apply)

    def active_hook_count(self) -> int:
        """Hooks installed right now (0 outside a `hooks` block): for tests and health checks."""
        n = sum(len(v) for v in self._state.hooks.values()) - len(self._cast_handles)  # those stay
        for mod in self.model.modules():
            n += sum(not _transformers_own(fn) for fn in [*mod._forward_hooks.values(), *mod._forward_pre_hooks.values()])
        return n

    # ------------------------------------------------------------------ forward
    def forward(self, ids: torch.Tensor, *, hooks: dict[str, HookFn | list[HookFn]] | None = None,
                start_layer: int = 0, resid: torch.Tensor | None = None, stop_layer: int | None = None,
                logit_positions: Sequence[int] | slice | None = (-1,),
                logit_ids: Sequence[int] | torch.Tensor | None = None,
                position_offset: int = 0,
                prefix_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> ForwardOutput:
        """Run the model on `ids` [b, s].

        start_layer/resid: begin at block `start_layer` with this residual stream [b, s, d]
        (the layers below are not recomputed). stop_layer: return after that many blocks
        with `resid_final` = the residual stream there and no logits. logit_positions:
        positions to project (None: all); logit_ids: vocabulary entries to project (None:
        all). position_offset/prefix_kv: `ids` continue a prefix whose keys/values are given
        ([1 or b, kv_heads, prefix positions, d_head] per layer; the q/k/v hook sites see the
        positions of `ids` only).
        """
        n_layers = self.spec.n_layers
        with self.hooks(hooks, prefix_kv=prefix_kv):
            b, s = ids.shape
            pos = torch.arange(position_offset, position_offset + s, device=self.device)
            pos = pos.unsqueeze(0).expand(b, -1)
            if resid is None:
                if start_layer != 0:
                    raise ValueError("start_layer > 0 needs the residual stream `resid` at that layer")
                x = self.adapter.embed(ids, pos)
            else:
                x = resid
            end = n_layers if stop_layer is None else stop_layer
            blocks = self.adapter.blocks()
            enter = self.devices.entering(self.adapter.block_kwargs(x.to(self.dtype), pos))  # rotary tables in the blocks' dtype
            x = x.float() if self._cast_handles else x
            try:
                for layer in range(start_layer, end):
                    x, kwargs = enter(layer, x)  # the residual stream crosses to the block's device
                    x = blocks[layer](x, **self.adapter.layer_kwargs(layer, kwargs))
                    x = x[0] if isinstance(x, tuple) else x  # blocks that also return weights (Falcon)
            except StopForward:
                return ForwardOutput(logits=None, resid_final=None)
            if stop_layer is not None and stop_layer < n_layers:
                return ForwardOutput(logits=None, resid_final=self.devices.to_home(x))
            x = self._state.apply("hook_resid_final", self.devices.to_out(x))
            if "ln_final.hook_scale" in self._state.hooks:
                self._state.apply("ln_final.hook_scale", self.final_norm_scale(x))
            if logit_positions is None:
                sel = x
            elif isinstance(logit_positions, slice):
                sel = x[:, logit_positions]
            else:
                sel = x[:, list(logit_positions)]
            normed = self._state.apply("ln_final.hook_normalized", self.final_norm(sel))
            logits = self.unembed(normed, logit_ids)
            logits = self._state.apply("hook_logits", logits)
            return ForwardOutput(logits=self.devices.to_home(logits), resid_final=self.devices.to_home(x))

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm; in float32 when the model runs in half precision (logits and the
        metrics read from them are accumulated in float32, docs/DESIGN.md §4)."""
        if self.dtype == torch.float32:
            return self.adapter.final_norm()(x)
        return apply_norm(self.adapter, self.adapter.final_norm(), x, self.spec.norm)

    def unembed(self, normed: torch.Tensor, logit_ids: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the normalised final residual stream, for `logit_ids` only if given; in
        the dtype of `normed` (float32 rows of the unembedding for a half-precision model),
        times the family's logit scale and through its final soft-cap."""
        W = param(self.adapter.unembed())  # [vocab, d]
        bias = param(self.adapter.unembed(), "bias")
        if W.device != normed.device:
            W, bias = W.to(normed.device), to_device(bias, normed.device)
        if logit_ids is not None:
            idx = torch.as_tensor(logit_ids, device=W.device)
            W = W[idx]
            bias = bias[idx] if bias is not None else None
        if W.dtype == normed.dtype:
            out = normed @ W.T
        else:  # upcast the unembedding a slice at a time (a 256k vocabulary in float32 is large)
            out = torch.cat([normed @ W[i:i + UNEMBED_CHUNK].to(normed.dtype).T
                             for i in range(0, W.shape[0], UNEMBED_CHUNK)], dim=-1)
        out = out + bias.to(out.dtype) if bias is not None else out
        if self.adapter.logit_scale != 1.0:
            out = out * self.adapter.logit_scale
        cap = self.adapter.final_softcap
        return torch.tanh(out / cap) * cap if cap else out

    def final_norm_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm's scale 1/sqrt(var + eps) (LayerNorm) or 1/rms (RMSNorm), [.., 1]."""
        return norm_scale(x, self.spec.norm, norm_eps(self.adapter.final_norm())).to(x.dtype)

    def precision(self) -> str:
        """What runs in which precision (model_info)."""
        return describe(self.dtype)

    # ------------------------------------------------------------------ capture
    def run_with_cache(self, ids: torch.Tensor, sites: Sequence[str], *,
                       hooks: dict[str, HookFn | list[HookFn]] | None = None,
                       **forward_kwargs) -> tuple[ForwardOutput, dict[str, torch.Tensor]]:
        """One forward pass that also returns the activations at `sites` (no copies are
        detached: call it under torch.enable_grad() with a leaf to take gradients)."""
        cache: dict[str, torch.Tensor] = {}

        home = self.device

        def save(x, site):
            cache[site] = x if x.device == home else x.to(home)  # differentiable: gradients still flow

        mapping: dict[str, list[HookFn]] = {}
        for site, fns in (hooks or {}).items():
            mapping[site] = list(fns) if isinstance(fns, list) else [fns]
        for site in sites:
            mapping.setdefault(site, []).append(save)  # after interventions: the value used
        out = self.forward(ids, hooks=mapping, **forward_kwargs)
        return out, cache
