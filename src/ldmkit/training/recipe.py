"""Multi-stage recipes (`ldmkit recipe RECIPE.yaml`): training stages run one after another, each starting from
the previous stage's final weights through `init` (ldmkit.transfer.init), e.g. ImageNet-22k 256 -> ImageNet-1k 256
-> ImageNet-1k 512. A stage whose run has reached its total_images is skipped and an interrupted stage resumes
from its own checkpoints, so re-running the command continues at the right stage.

Recipe file:
    name: in1k-256-to-512
    stages:
      - name: in1k-256                       # run folder <out>/<name>
        config: configs/imagenet256/proposed_xl2.yaml
        set: [train.total_images=51200000]   # overrides, as --set
      - name: in1k-512
        config: configs/imagenet512/proposed_xl2.yaml
        init: in1k-256                       # a previous stage (its final weights), or a path
        set: [model.pos_embed_base_size=32, model.pos_embed_resample=rectified]
"""

from __future__ import annotations

import re
from pathlib import Path

from ..config import ConfigError, find_config, load_config, read_yaml_mapping

STAGE_KEYS = {"name", "config", "init", "set"}


def read_recipe(path: str | Path) -> dict:
    path = find_config(path, what="recipe")
    recipe = read_yaml_mapping(path, "recipe")
    if not isinstance(recipe.get("stages"), list) or not recipe["stages"]:
        raise ConfigError(f"recipe {path}: needs 'name' and a non-empty list 'stages'")
    unknown = set(recipe) - {"name", "stages"}
    if unknown:
        raise ConfigError(f"recipe {path}: unknown key '{sorted(unknown)[0]}' (keys: name, stages)")
    names = []
    for i, stage in enumerate(recipe["stages"]):
        where = f"recipe {path}, stage {i + 1}"
        if not isinstance(stage, dict) or "name" not in stage or "config" not in stage:
            raise ConfigError(f"{where}: each stage needs 'name' and 'config'")
        extra = set(stage) - STAGE_KEYS
        if extra:
            raise ConfigError(f"{where}: unknown key '{sorted(extra)[0]}' (keys: {', '.join(sorted(STAGE_KEYS))})")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(stage["name"])) or stage["name"] in names:
            raise ConfigError(f"{where}: stage name {stage['name']!r} must be unique letters, digits, '-', '_' or '.'")
        if "init" in stage and stage["init"] not in names and not Path(str(stage["init"])).exists():
            raise ConfigError(f"{where}: init {stage['init']!r} is neither an earlier stage nor an existing path")
        if not isinstance(stage.get("set", []), list):
            raise ConfigError(f"{where}: 'set' is a list of KEY=VALUE overrides")
        names.append(stage["name"])
    recipe.setdefault("name", path.stem)
    recipe["path"] = path
    return recipe


def stage_configs(recipe: dict, out: Path, extra_overrides: list[str] | None = None) -> list[tuple[str, object, Path]]:
    """(stage name, config, run folder) per stage, every config loaded (and so checked) before anything runs."""
    stages = []
    for stage in recipe["stages"]:
        overrides = [str(s) for s in stage.get("set", [])] + list(extra_overrides or [])
        if "init" in stage:
            source = (
                out / stage["init"]
                if any(s["name"] == stage["init"] for s in recipe["stages"])
                else Path(stage["init"])
            )
            overrides.append(f"init.source={source}")
        config = find_config(stage["config"], relative_to=recipe["path"])  # as given, beside the recipe, or shipped
        stages.append((stage["name"], load_config(config, overrides), out / stage["name"]))
    return stages


def stage_done(cfg, run_dir: Path) -> bool:
    from ..checkpoint import latest_checkpoint

    last = latest_checkpoint(run_dir)
    return last is not None and int(re.search(r"(\d+)", last.name).group(1)) >= cfg.train.total_images


def run_recipe(
    path: str | Path, out: str | Path | None = None, extra_overrides: list[str] | None = None, log=print
) -> list[Path]:
    from .loop import training_loop

    recipe = read_recipe(path)
    out = Path(out or Path("runs") / recipe["name"])
    stages = stage_configs(recipe, out, extra_overrides)
    for i, (name, cfg, run_dir) in enumerate(stages):
        if stage_done(cfg, run_dir):
            log(f"stage {i + 1}/{len(stages)} {name}: done ({run_dir})")
            continue
        log(f"stage {i + 1}/{len(stages)} {name}: training in {run_dir}")
        training_loop(cfg, run_dir)
    return [run_dir for _, _, run_dir in stages]
