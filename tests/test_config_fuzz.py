"""Property: whatever value a user types for any config key, `ldmkit train` either trains a step or stops with a
one-line error (exit code 2) naming what is wrong; never a traceback, never an unexpected error.

The values come from pools per type that mix valid and invalid ones (signs, zero, edges, NaN, infinity, wrong
types, every choice word the config knows). Examples are derandomised so CI is reproducible;
LDMKIT_FUZZ_EXAMPLES raises their number for a longer local search.
"""

import contextlib
import dataclasses
import io
import math
import os
import shutil
import tempfile
import typing
from pathlib import Path

import pytest
from conftest import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldmkit.cli import main
from ldmkit.config import RunConfig

INTS = [-1, 0, 1, 2, 3, 16, 64]
FLOATS = [-1.0, 0.0, 1e-3, 0.5, 0.9999, 1.0, 2.0, 1e30, math.nan, math.inf, -math.inf]
WORDS = [
    "",
    "bogus",
    "../x",
    "ddpm",
    "flow",
    "ddim",
    "euler",
    "heun",
    "cosine",
    "linear",
    "constant",
    "none",
    "minilm",
    "t5",
    "class",
    "text",
    "pooled_text",
    "shards",
    "image_folder",
    "mnist",
    "kl",
    "identity",
    "sd3",
    "bf16",
    "fp32",
    "adan",
    "cuda",
    "cpu",
    "disentangled",
    "additive",
    "published",
    "random_resized",
    "center",
    "none",
    "noisy_replicate",
    "replicate",
    "wnid",
    "replace",
    "rectified",
    "interpolate",
    "logit_normal",
    "trailing",
    "imagenet1k",
    "original_size",
    "flip",
]
LISTS = [[], [0.5], [0.9, 0.95], [0.98, 0.92, 0.99], [-1, 2], ["bogus"], [[16, 16]], [0.0, 1.0]]
# Values that would make one example slow rather than wrong (thousands of blocks, many worker processes).
CAPPED = {"data.num_workers": [-1, 0, 1, 2]}


def config_keys() -> dict[str, object]:
    """Every config key (dotted) with its annotation."""
    keys = {}

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], prefix + f.name + ".")
            else:
                keys[prefix + f.name] = hints[f.name]

    walk(RunConfig, "")
    return keys


KEYS = config_keys()


def pool(key: str, annotation) -> list:
    if key in CAPPED:
        return CAPPED[key]
    args = set(typing.get_args(annotation)) or {annotation}
    values = [None, "bogus", True]  # a missing value and wrong types for every key
    if int in args:
        values += INTS
    if float in args:
        values += FLOATS
    if str in args:
        values += WORDS
    if bool in args:
        values += [False, 3]
    if typing.get_origin(annotation) is list:
        values += LISTS
    return values


def yaml_text(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(yaml_text(v) for v in value) + "]"
    return str(value)


@st.composite
def mutations(draw):
    count = draw(st.integers(1, 2))
    keys = draw(st.lists(st.sampled_from(sorted(KEYS)), min_size=count, max_size=count, unique=True))
    return [(key, draw(st.sampled_from(pool(key, KEYS[key])))) for key in keys]


def train_one_step(changes) -> tuple[int, str, Path]:
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    config = root / "c.yaml"
    config.write_text("name: fuzz\n")
    base = TINY + [
        "train.total_images=32",
        "eval.classifier_epochs=1",
        "eval.train_metric_images=4",
        "sample.per_class=1",
    ]
    argv = ["train", str(config), "--out", str(root / "run"), "--stop-after", "16"]
    for o in base + [f"{key}={yaml_text(value)}" for key, value in changes]:
        argv += ["--set", o]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue(), root


@settings(
    max_examples=int(os.environ.get("LDMKIT_FUZZ_EXAMPLES", "40")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(mutations())
@pytest.mark.slow
def test_any_config_value_trains_or_fails_in_one_line(changes):
    code, err, root = train_one_step(changes)
    try:
        assert "Traceback" not in err, (changes, err)
        assert code in (0, 2), (changes, err)
        if code == 0:
            assert list((root / "run" / "checkpoints").glob("ckpt-*.pt")), (changes, err)
        else:
            last = err.strip().splitlines()[-1]
            assert last.startswith("ldmkit train: error: "), (changes, err)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("key", sorted(KEYS))
def test_every_key_names_itself_when_given_a_wrong_type(key):
    """A mapping is the wrong type for every key: the one-line error names the key."""
    code, err, root = train_one_step([(key, "{a: 1}")])
    shutil.rmtree(root, ignore_errors=True)
    assert code == 2
    assert f"'{key}'" in err.strip().splitlines()[-1], err
