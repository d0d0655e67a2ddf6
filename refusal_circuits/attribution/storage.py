"""An :class:`~refusal_circuits.attribution.records.Attribution` on disk: safetensors and JSON, never pickle.

A directory holds three files, written together and atomically: :data:`TENSORS_FILE` (the score tensors),
:data:`TOKENS_FILE` (ids, languages, labels, tokens, spans, provenance) and :data:`SUMMARY_FILE` (what
:meth:`~refusal_circuits.attribution.records.Attribution.summary` returns).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor

from refusal_circuits.attribution.records import Attribution, LogitAttribution
from refusal_circuits.attribution.targets import LogitTargets
from refusal_circuits.chat import SPAN_NAMES
from refusal_circuits.errors import InputError

#: The file names :meth:`Attribution.save` writes.
TENSORS_FILE = "attributions.safetensors"
TOKENS_FILE = "attributions.json"
SUMMARY_FILE = "summary.json"


def save_attribution(att: Attribution, out_dir: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
    """Write ``attributions.safetensors``, ``attributions.json`` (tokens, spans) and ``summary.json``, together
    and atomically: all three are written before any replaces an older set.

    In the file, ``mlps`` includes the attention output bias of its layer when the model has one (stated in
    the summary), so ``resid[:, l] = embed + sum_{l' < l} (heads.sum(head) + mlps)`` holds on the file alone.
    ``extra`` joins the JSON metadata.
    """
    from safetensors.torch import save

    from refusal_circuits.io import atomic_paths, json_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mlps = att.mlps if att.attn_bias is None else att.mlps + att.attn_bias
    tensors: dict[str, Tensor] = {
        "embed": att.embed, "heads": att.heads, "mlps": mlps, "resid": att.resid, "mask": att.mask,
        "spans": att.spans, "sources": att.sources, "attn_mass": att.attn_mass}
    if att.attn_bias is not None:
        tensors["attn_bias"] = att.attn_bias
    if att.dla is not None:
        tensors.update(att.dla.tensors())
    s = att.mask.shape[1]
    padded_tokens = [[""] * (s - len(t)) + t for t in att.tokens]
    meta = {
        "model": att.model, "ids": att.ids, "langs": att.langs, "labels": att.labels,
        "span_names": list(SPAN_NAMES), "tokens": padded_tokens,
        "spans": [[SPAN_NAMES[c] for c in row] for row in att.spans.tolist()],
        "adv_suffix": att.adv_suffix, "direction": att.direction,
        "dla_targets": None if att.dla is None else att.dla.targets.to_json(),
        "dla_space": None if att.dla is None else att.dla.space,
        "has_attn_bias": att.attn_bias is not None, **(extra or {})}
    with atomic_paths(out / TENSORS_FILE, out / TOKENS_FILE, out / SUMMARY_FILE) as (t_tmp, j_tmp, s_tmp):
        t_tmp.write_bytes(save({k: v.contiguous() for k, v in tensors.items()}))
        j_tmp.write_text(json_text(meta), encoding="utf-8")
        s_tmp.write_text(json_text(att.summary()), encoding="utf-8")
    return out


def load_attribution(path: str | os.PathLike[str]) -> Attribution:
    """Read a directory written by :meth:`Attribution.save` (safetensors and JSON only, never pickle)."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(path)
    tfile, jfile = d / TENSORS_FILE, d / TOKENS_FILE
    for f in (tfile, jfile):
        if not f.is_file():
            raise InputError(f"{f}: not found (expected a directory written by `refusal-circuits attribute`)")
    try:
        t = load_file(str(tfile))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{tfile}: not a readable safetensors file ({e})") from None
    try:
        meta = json.loads(jfile.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{jfile}: not valid JSON ({e})") from None
    need = ["embed", "heads", "mlps", "resid", "mask", "spans", "sources", "attn_mass"]
    missing = [k for k in need if k not in t] + [k for k in ("ids", "langs", "labels", "tokens") if k not in meta]
    if missing:
        raise InputError(f"{d}: missing {', '.join(missing)}")
    n = int(t["heads"].shape[0])
    if any(len(meta[k]) != n for k in ("ids", "langs", "labels", "tokens")):
        raise InputError(f"{jfile}: ids/langs/labels/tokens do not match the {n} prompts of {tfile}")
    attn_bias = t.get("attn_bias")
    mlps = t["mlps"] - attn_bias if attn_bias is not None else t["mlps"]
    dla = None
    if "dla_heads" in t and meta.get("dla_targets"):
        tj = meta["dla_targets"]
        strings = {int(i): s for key in ("refusal", "compliance")
                   for ids_, strs in zip(tj[f"{key}_ids"].values(), tj[key].values(), strict=True)
                   for i, s in zip(ids_, strs, strict=True)}
        targets = LogitTargets({k: tuple(v) for k, v in tj["refusal_ids"].items()},
                               {k: tuple(v) for k, v in tj["compliance_ids"].items()}, strings)
        bias = t.get("dla_bias")
        dla = LogitAttribution(t["dla_embed"], t["dla_heads"], t["dla_mlps"] - bias if bias is not None else t["dla_mlps"],
                               bias, t["dla_const"], t["dla_logit_diff"], t["dla_scale"], targets,
                               str(meta.get("dla_space") or "logits"))
    tokens = [[tok for tok, m in zip(row, mrow, strict=True) if m] for row, mrow in zip(meta["tokens"], t["mask"].tolist(),
                                                                                         strict=True)]
    return Attribution(embed=t["embed"], heads=t["heads"], mlps=mlps, attn_bias=attn_bias, resid=t["resid"],
                       mask=t["mask"], spans=t["spans"], sources=t["sources"], attn_mass=t["attn_mass"], dla=dla,
                       ids=list(meta["ids"]), langs=list(meta["langs"]), labels=list(meta["labels"]), tokens=tokens,
                       model=str(meta.get("model", "")), direction=dict(meta.get("direction") or {}),
                       adv_suffix=meta.get("adv_suffix"))

