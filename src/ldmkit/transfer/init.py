"""Start a run from another model's weights (`init.source`, `ldmkit train --init FROM`): PAPER.md section 3.

Every tensor of the new model gets one explicit action, reported at start and written to <run>/init.json:
- loaded      same name and shape in the source;
- recomputed  a fixed table derived from the grid (sin-cos positions, relative-position indices) for the new grid;
- resampled   a learned positional table or relative-position bias for another grid (init.pos_embed mode);
- remapped    class-table rows matched by WordNet id between the source's and this run's class index
              (init.class_map: wnid; classes the source lacks start fresh and are counted);
- fresh       kept from the new model's initialisation: control embeddings or cross-attentions the source lacks
              (their outputs are zero-initialised, so the model starts as the source), or the text embedders
              when init.semantic is replace (class -> text);
- dropped     a source tensor with no place in the new model: only the class table when init.semantic is replace.
Anything else that does not fit is an error naming the tensor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from ..models.registry import spec_of
from .resample import resample_learned, resample_relative_bias

ZERO_STARTED = ("control_embedder.",)  # outputs zero-initialised: the new model computes what the source did


class InitError(ValueError):
    """A source that does not fit the new model under the init rules (one line naming the tensor)."""


def read_source(source: str | Path, weights: str = "ema") -> tuple[dict, dict | None]:
    """(state dict in ldmkit names, the source's embedded ldmkit config or None) from a run folder, an ldmkit
    checkpoint (including one written by `ldmkit convert`), an official DiT checkpoint or a diffusers DiT folder."""
    from ..checkpoint import latest_checkpoint, load_checkpoint, run_checkpoint
    from ..models.registry import detect_backbone
    from ..models.spec import ConversionError
    from .checkpoints import read_weights

    path = Path(source)
    if path.is_dir() and (path / "checkpoints").is_dir():
        if latest_checkpoint(path) is None:
            raise InitError(f"config key 'init.source': run {path} has no checkpoint yet")
        state = run_checkpoint(path, require=("config", weights))[1]
        return state[weights], state["config"]
    if not path.exists():
        raise InitError(f"config key 'init.source': {source} does not exist")
    if path.is_file() and path.suffix in (".pt", ".pth", ".ckpt"):
        state = load_checkpoint(path)
        if "config" in state and "model" in state:
            return state[weights], state["config"]  # weights: ema | model (checked with the config)
    try:
        sd, layout, embedded, _ = read_weights(path)
        if layout != "ldmkit":  # foreign weights in ldmkit's names, by the backbone's own mapping
            sd = detect_backbone(sd)[0].import_weights(sd, layout)
    except ConversionError as e:
        raise InitError(f"config key 'init.source': {e}") from None
    return sd, embedded


def _class_ids(class_index: str | None, table_rows: int) -> list[str] | None:
    """WordNet ids in class order from a class index (name or file), or the shipped list the class table's row
    count implies (classes, or classes + the null row); None when neither tells."""
    from ..data.datasets import read_class_index

    if class_index is None:
        class_index = next(
            (name for rows, name in ((1000, "imagenet1k"), (21841, "imagenet22k")) if table_rows in (rows, rows + 1)),
            None,
        )
    if class_index is None:
        return None
    index = read_class_index(class_index)
    return [wnid for wnid, _ in sorted(index.items(), key=lambda item: item[1])]


def _remap_classes(
    old: torch.Tensor, new: torch.Tensor, source_ids: list[str], target_ids: list[str]
) -> tuple[torch.Tensor, int]:
    """Rows of `new` (target classes [+ null row]) taken from `old` by WordNet id; the null row from the null row."""
    out = new.clone()
    row_of = {wnid: i for i, wnid in enumerate(source_ids)}
    missing = 0
    for i, wnid in enumerate(target_ids):
        if wnid in row_of:
            out[i] = old[row_of[wnid]]
        else:
            missing += 1
    if new.shape[0] == len(target_ids) + 1 and old.shape[0] == len(source_ids) + 1:
        out[-1] = old[-1]  # the learned null class of guidance dropout
    return out, missing


def plan_and_apply(model: nn.Module, source_sd: dict, source_cfg: dict | None, cfg) -> list[dict]:
    """Fill model's tensors from source_sd by the rules above; returns the report (one entry per tensor)."""
    ic = cfg.init
    spec = spec_of(model)
    own = model.state_dict()
    buffers = {name for name, _ in model.named_buffers()}
    out, report, used = {}, [], set()

    def note(name, action, why, src=None):
        entry = {
            "tensor": name,
            "action": action,
            "why": why,
            "shape": list(own[name].shape) if name in own else list(src.shape),
        }
        if src is not None and name in own and tuple(src.shape) != tuple(own[name].shape):
            entry["source_shape"] = list(src.shape)
        report.append(entry)

    replace_semantic = ic.semantic == "replace"
    for name, target in own.items():
        src = source_sd.get(name)
        leaf = name.rsplit(".", 1)[-1]
        fixed_table = name in buffers and leaf in ("pos_embed", "relative_position_index")
        if (
            fixed_table
            and src is not None
            and not (src.shape == target.shape and torch.allclose(src.float(), target.float(), atol=1e-6))
        ):
            # the model computes its fixed tables from its config (grid, model.pos_embed_*): those values win
            used.add(name)
            note(
                name,
                "recomputed",
                f"fixed table of the grid, computed for this model (model.pos_embed_resample: "
                f"{getattr(cfg.model, 'pos_embed_resample', 'extrapolate')})",
                src,
            )
        elif src is not None and tuple(src.shape) == tuple(target.shape):
            out[name] = src.to(target.dtype)
            used.add(name)
            note(name, "loaded", "same name and shape")
        elif src is not None and leaf.endswith("pos_embed"):  # learned table: resample to the new grid
            old, new = math.isqrt(src.shape[-2]), math.isqrt(target.shape[-2])
            if old * old != src.shape[-2] or new * new != target.shape[-2]:
                raise InitError(
                    f"init: positional table '{name}' is not square ({src.shape[-2]} -> {target.shape[-2]} positions)"
                )
            out[name] = resample_learned(src, (old, old), (new, new), ic.pos_embed).to(target.dtype)
            used.add(name)
            note(name, "resampled", f"learned table {old}x{old} -> {new}x{new} ({ic.pos_embed})", src)
        elif src is not None and leaf == "relative_position_bias_table":
            new = model.get_submodule(name.rsplit(".", 1)[0]).grid
            extra = target.shape[0] - (2 * new - 1) ** 2
            old = (math.isqrt(src.shape[0] - extra) + 1) // 2
            if (2 * old - 1) ** 2 + extra != src.shape[0]:
                raise InitError(
                    f"init: relative-position table '{name}' has {src.shape[0]} rows, which fits no square grid"
                )
            out[name] = resample_relative_bias(src, old, new, ic.pos_embed, extra).to(target.dtype)
            used.add(name)
            note(name, "resampled", f"relative offsets of a {old}x{old} grid -> {new}x{new} ({ic.pos_embed})", src)
        elif src is not None and name in spec.class_tables:
            if ic.class_map != "wnid":
                raise InitError(
                    f"init: class table '{name}' has {src.shape[0]} rows in the source and {target.shape[0]} here; "
                    f"set init.class_map: wnid to match classes by WordNet id"
                )
            source_index = ic.source_class_index or (source_cfg or {}).get("data", {}).get("class_index")
            source_ids, target_ids = (
                _class_ids(source_index, src.shape[0]),
                _class_ids(cfg.data.class_index, target.shape[0]),
            )
            if source_ids is None or target_ids is None:
                raise InitError(
                    "init: the class indexes are unknown; set data.class_index (and init.source_class_index for the "
                    "source)"
                )
            out[name], missing = _remap_classes(src, target, source_ids, target_ids)
            used.add(name)
            note(
                name,
                "remapped",
                f"{len(target_ids) - missing} of {len(target_ids)} classes by WordNet id from the source's "
                f"{len(source_ids)}; {missing} absent there start fresh",
                src,
            )
        elif src is None and fixed_table:
            note(name, "recomputed", "fixed table of the grid, which the source does not store (diffusers computes it)")
        elif src is None and name.startswith(ZERO_STARTED):
            note(name, "fresh", "control embedding the source lacks (zero-initialised output: starts as the source)")
        elif src is None and (".cross_attn." in name or ".norm_cross" in name):
            note(name, "fresh", "cross-attention the source lacks (zero-initialised output: starts as the source)")
        elif src is None and replace_semantic and name.startswith(spec.text_embedders):
            note(name, "fresh", "text embedder replacing the source's class embedder (init.semantic: replace)")
        elif src is None:
            raise InitError(
                f"init: tensor '{name}' of this model is not in the source, and no rule covers it "
                f"(another architecture or conditioning?)"
            )
        else:
            raise InitError(
                f"init: tensor '{name}' has shape {list(src.shape)} in the source and {list(target.shape)} here, "
                f"and no rule covers it"
            )
        if name not in out:
            out[name] = target
    for name, src in source_sd.items():
        if name in used:
            continue
        if replace_semantic and name in spec.class_tables:
            note(name, "dropped", "the source's class embedder (init.semantic: replace)", src)
        elif name in own:
            continue
        else:
            raise InitError(
                f"init: source tensor '{name}' has no place in this model (set init.semantic: replace for class -> "
                "text)"
            )
    model.load_state_dict(out)
    return report


def initialize_from(model: nn.Module, cfg, log=print) -> list[dict]:
    """Apply cfg.init to a freshly built model; logs a summary (counts per action, every non-loaded tensor)."""
    sd, source_cfg = read_source(cfg.init.source, cfg.init.weights)
    report = plan_and_apply(model, sd, source_cfg, cfg)
    counts = {}
    for entry in report:
        counts[entry["action"]] = counts.get(entry["action"], 0) + 1
    log(f"init from {cfg.init.source}: " + ", ".join(f"{n} {a}" for a, n in counts.items()))
    for entry in report:
        if entry["action"] != "loaded":
            log(f"  {entry['action']:<10} {entry['tensor']}: {entry['why']}")
    return report


def write_report(report: list[dict], source: str, run_dir: Path) -> None:
    (Path(run_dir) / "init.json").write_text(json.dumps({"source": str(source), "tensors": report}, indent=1))
