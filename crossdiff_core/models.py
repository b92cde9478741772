"""Paired models: load a base model and its chat-tuned version, check that they belong together, and read
the residual stream output of block `L` without computing the blocks after it.

`residual output of block L` is what block `L` returns, i.e. `output_hidden_states[L + 1]` of an ordinary
forward pass for every block but the last (transformers applies the final norm to the last entry of
`output_hidden_states`; for the last block we return the raw block output, before that norm).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from crossdiff_core.errors import ConfigError, CrossdiffError, ModelMismatchError

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}

# Probe text for the tokenizer check: words, digits, whitespace runs, punctuation, accents, CJK, emoji.
PROBE_TEXT = (
    "The quick brown fox jumps over 13 lazy dogs.\n\n  Indented\tline; café, naïve — 東京 🙂 "
    "x=[1, 2, 3]; print(f'{x!r}') <b>bold</b> ¿Qué? https://example.org/a?b=c"
)

_LAYER_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers",
                "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """`"bfloat16"` / `"float32"` / `"float16"` (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively: a CUDA device that supports bf16, or a CPU
    with AVX512-BF16 or AMX. Elsewhere torch emulates them, and a bf16 autocast costs time instead of saving it
    (on an AVX2-only CPU a product ran 21x slower in bf16 than in fp32: BENCHMARKS.md)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type != "cpu":
        return False
    # torch.cpu's capability probes (private, so each is looked up: a torch without one counts as no)
    return any(bool(getattr(torch.cpu, probe, lambda: False)())
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_device(device: str | torch.device) -> torch.device:
    """`"auto"` picks CUDA when available, else CPU; anything else is passed to `torch.device` and must
    exist here (a CUDA device without CUDA, or past the last GPU, is a :class:`ConfigError` before any work)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from exc
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"--device {device} asks for CUDA, which this machine (or this torch build) does not "
                              "have: use --device cpu, or auto (CUDA when available)")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"--device {device}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise ConfigError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or auto")
    return dev


# config keys that say how a model was loaded or saved, not what it is (dtype: loading in bfloat16 or
# float32 is the same model)
_VOLATILE_CONFIG_KEYS = ("transformers_version", "dtype", "torch_dtype", "attn_implementation")
_FINGERPRINT_SAMPLE = 1 << 20  # elements hashed per tensor at most (a strided sample of larger ones)


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """Content fingerprint of a loaded model: ``{"config": sha256, "weights": sha256}`` (hex).

    ``config``: the model's configuration (what its config.json says) without the keys that only say how it
    was loaded (name or path, dtype, library version). ``weights``: the input embedding and every parameter
    of the first and last decoder block, each rounded to bfloat16 (so the dtype a model is loaded in does
    not change it) and, beyond 2^20 elements, a fixed strided sample of it: cheap at any model size, and a
    model rebuilt or retrained at the same path differs in all of them."""
    import json

    cfg = {k: v for k, v in model.config.to_dict().items()
           if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    config_sha = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    blocks = decoder_layers(model)
    tensors = [("embed", model.get_input_embeddings().weight)]
    for tag, block in (("first", blocks[0]), ("last", blocks[len(blocks) - 1])):
        tensors += [(f"{tag}.{n}", t) for n, t in block.named_parameters()]
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in tensors:
            flat = t.detach().reshape(-1)
            step = max(1, -(-flat.numel() // _FINGERPRINT_SAMPLE))
            sample = flat[::step].to(torch.bfloat16).view(torch.int16).cpu().numpy()
            h.update(f"{name}:{list(t.shape)}:".encode())
            h.update(sample.tobytes())
    return {"config": config_sha, "weights": h.hexdigest()}


def fingerprint_differences(recorded: dict, found: dict) -> list[str]:
    """Which parts of two :func:`model_fingerprint` records differ (``"config"``, ``"weights"``)."""
    return [k for k in ("config", "weights") if (recorded or {}).get(k) != (found or {}).get(k)]


def text_config(config: Any) -> Any:
    """The language-model part of a config (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (Llama, Gemma 2/3, Mistral, Qwen, GPT-2, GPT-NeoX, ...)."""
    n_layers = text_config(model.config).num_hidden_layers
    for path in _LAYER_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) == n_layers:
            return obj
    for _, module in model.named_modules():  # shallowest ModuleList of the right length
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ModelMismatchError(
        f"cannot find the {n_layers} decoder blocks of {type(model).__name__}; "
        "use a decoder-only causal LM (Llama, Gemma, Mistral, Qwen, GPT-2 families)"
    )


class _StopForward(Exception):
    """Raised by the hook on block L so that the blocks after it are never computed."""


def block_outputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  *, layers: Sequence[int]) -> list[torch.Tensor]:
    """Residual stream outputs of blocks ``layers``, each ``[batch, seq, d]`` in the model's dtype, on its
    device; the blocks after the last of them (and the LM head) are never computed.

    Forward hooks on the blocks capture their outputs, the last one raises. Hooking the block modules
    keeps every architecture's own embedding scaling (Gemma's sqrt(d)), rotary embeddings and masks intact.
    Gradients flow as the caller's mode allows."""
    blocks = decoder_layers(model)
    last = max(layers)
    captured: dict[int, torch.Tensor] = {}

    def hook_for(i: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            captured[i] = output[0] if isinstance(output, tuple) else output
            if i == last:
                raise _StopForward
        return hook

    handles = [blocks[i].register_forward_hook(hook_for(i)) for i in sorted(set(layers))]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if last not in captured:
        raise CrossdiffError(f"block {last} of {type(model).__name__} never ran; the model skips layers")
    return [captured[i] for i in layers]


@torch.inference_mode()
def residual_stream(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    *, layer: int) -> torch.Tensor:
    """Residual stream output of block `layer`, `[batch, seq, d]` (:func:`block_outputs` without gradients)."""
    return block_outputs(model, input_ids, attention_mask, layers=[layer])[0]


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the tokenizer's full serialised definition (vocabulary, merges, added tokens, normaliser)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:  # slow tokenizers: hash the vocabulary
        blob = "\n".join(f"{t}\t{i}" for t, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _probe_texts(chat_tokenizer: Any) -> list[str]:
    texts = [PROBE_TEXT]
    if getattr(chat_tokenizer, "chat_template", None):
        conv = [{"role": "user", "content": "Hi there, who are you?"},
                {"role": "assistant", "content": "I am a helpful assistant."}]
        try:
            texts.append(chat_tokenizer.apply_chat_template(conv, tokenize=False))
        except Exception:  # noqa: BLE001 - a template that refuses this probe is checked when data is built
            pass
    return texts


def check_pair(base_config: Any, chat_config: Any, base_tokenizer: Any, chat_tokenizer: Any, layer: int,
               *, names: tuple[str, str] = ("base", "chat")) -> None:
    """Raise `ModelMismatchError` / `ConfigError` unless the two models can be diffed at block `layer`.

    Checks: identical token ids on probe texts (plain text and a rendered chat), the same tokenizer
    vocabulary size and embedding size, the same hidden size, and `0 <= layer < num_hidden_layers`.
    """
    b_name, c_name = names
    bc, cc = text_config(base_config), text_config(chat_config)
    if len(base_tokenizer) != len(chat_tokenizer):
        raise ModelMismatchError(
            f"tokenizers differ in vocabulary size: {b_name} has {len(base_tokenizer)} tokens, {c_name} has "
            f"{len(chat_tokenizer)}; pass a chat model fine-tuned from this base (same tokenizer)")
    if bc.vocab_size != cc.vocab_size:
        raise ModelMismatchError(
            f"embedding sizes differ: {b_name} vocab_size={bc.vocab_size}, {c_name} vocab_size={cc.vocab_size}; "
            "pass a chat model fine-tuned from this base")
    for text in _probe_texts(chat_tokenizer):
        ids_b = base_tokenizer(text, add_special_tokens=False)["input_ids"]
        ids_c = chat_tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids_b != ids_c:
            first = next((i for i, (a, b) in enumerate(zip(ids_b, ids_c)) if a != b), min(len(ids_b), len(ids_c)))
            raise ModelMismatchError(
                f"tokenizers give different token ids on the probe text {text[:40]!r}... (first difference "
                f"at token {first}); the two models must share one tokenizer: pass a chat model fine-tuned "
                f"from this base, or the same tokenizer files for both")
    if bc.hidden_size != cc.hidden_size:
        raise ModelMismatchError(
            f"hidden sizes differ: {b_name} d={bc.hidden_size}, {c_name} d={cc.hidden_size}; a crosscoder "
            "needs two models of the same width (a base model and its fine-tuned version)")
    for name, cfg in ((b_name, bc), (c_name, cc)):
        if not 0 <= layer < cfg.num_hidden_layers:
            raise ConfigError(
                f"layer {layer} does not exist in {name} ({cfg.num_hidden_layers} blocks); "
                f"choose a layer in 0..{cfg.num_hidden_layers - 1} (mid-depth is usual)")


def _load_config_and_tokenizer(name: str, revision: str | None) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load model {name!r}: {exc}. Pass a local directory saved with save_pretrained "
            "(config.json, weights, tokenizer files) or a hub id that is in the local cache "
            "(offline: HF_HUB_OFFLINE=1)") from exc
    return config, tokenizer


@dataclass
class ModelPair:
    """A base model and its chat-tuned version, checked to share a tokenizer and width.

    `tokenizer` is the chat model's tokenizer (its chat template formats conversations); its ids are
    verified identical to the base tokenizer's, so both models see the same token ids.
    """

    base: nn.Module
    chat: nn.Module
    tokenizer: Any
    layer: int
    base_name: str
    chat_name: str
    dtype: torch.dtype
    device: torch.device
    # how the pair was checked against a crosscoder's training cache (runs.check_models), for the records
    models_check: str | None = None
    _fingerprints: dict | None = field(default=None, repr=False, compare=False)

    @property
    def d_model(self) -> int:
        return int(text_config(self.base.config).hidden_size)

    def residuals(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block-`layer` residual output of both models, each `[batch, seq, d]` (model dtype, model device)."""
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        return (residual_stream(self.base, input_ids, attention_mask, layer=self.layer),
                residual_stream(self.chat, input_ids, attention_mask, layer=self.layer))

    def fingerprints(self) -> dict[str, dict[str, str]]:
        """:func:`model_fingerprint` of each model, ``{"base": ..., "chat": ...}`` (computed once)."""
        if self._fingerprints is None:
            self._fingerprints = {"base": model_fingerprint(self.base), "chat": model_fingerprint(self.chat)}
        return self._fingerprints

    def metadata(self) -> dict[str, Any]:
        """What a cache manifest records about the pair: names, revisions and content fingerprints
        (what a later stage checks the models it loads against)."""
        def revision(model: nn.Module) -> str | None:
            return getattr(model.config, "_commit_hash", None)

        return {
            "models": {"base": self.base_name, "chat": self.chat_name,
                       "revisions": {"base": revision(self.base), "chat": revision(self.chat)},
                       "architectures": {"base": type(self.base).__name__, "chat": type(self.chat).__name__},
                       "dtype": str(self.dtype).removeprefix("torch."),
                       "fingerprints": self.fingerprints()},
            "tokenizer_hash": tokenizer_hash(self.tokenizer),
            "chat_template": getattr(self.tokenizer, "chat_template", None),
        }


def load_model(name: str, *, dtype: str | torch.dtype = "bfloat16", device: str | torch.device = "cpu",
               revision: str | None = None) -> nn.Module:
    """`AutoModelForCausalLM` from a local directory or hub id, in `dtype` on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=torch_dtype(dtype))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load model weights from {name!r}: {exc}. Pass a directory saved with "
                          "save_pretrained or a cached hub id") from exc
    return model.to(resolve_device(device)).eval()


def load_pair(base: str, chat: str, *, layer: int, dtype: str | torch.dtype = "bfloat16",
              device: str | torch.device = "cpu", base_revision: str | None = None,
              chat_revision: str | None = None) -> ModelPair:
    """Load and check a base/chat pair. Configs and tokenizers are checked before any weights load."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ConfigError(f"layer must be an int, got {layer!r}")
    dt, dev = torch_dtype(dtype), resolve_device(device)
    base_cfg, base_tok = _load_config_and_tokenizer(base, base_revision)
    chat_cfg, chat_tok = _load_config_and_tokenizer(chat, chat_revision)
    check_pair(base_cfg, chat_cfg, base_tok, chat_tok, layer, names=(f"base {base!r}", f"chat {chat!r}"))
    return ModelPair(base=load_model(base, dtype=dt, device=dev, revision=base_revision),
                     chat=load_model(chat, dtype=dt, device=dev, revision=chat_revision),
                     tokenizer=chat_tok, layer=layer, base_name=str(base), chat_name=str(chat),
                     dtype=dt, device=dev)
