"""A guard for refactoring: each backbone trains a few steps with a fixed seed, and the resulting weights must
equal, bit for bit, the weights recorded before the refactor (tests/data/refactor_guard.json holds a SHA-256 of
every tensor of the model and the EMA).

Bit equality is defined only for the same torch build, CPU kernel set and CPU model (the same torch and AVX512
kernel set gave other bits on an AMD EPYC than on the CPU of the first record), so each record names all three; the
file keeps one record per environment, and where none matches the test is skipped with a visible reason.
Re-record deliberately, after a change that is meant to alter training, on every machine kind you have (or add this
machine's record, after checking that the code it records trains as the last recorded commit did), with:
  python tests/test_refactor_guard.py --record
"""

import hashlib
import json
import platform
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import THREADS, TINY  # noqa: E402

RECORD = Path(__file__).parent / "data" / "refactor_guard.json"
SHORT = [
    "data.resolution=16",
    "model.input_size=16",
    "train.total_images=48",
    "train.global_batch=16",
    "train.log_every_images=16",
    "train.checkpoint_every_images=48",
    "train.lr=0.002",
]
FLOW = ["diffusion.objective=flow", "model.learn_sigma=false", "sample.sampler=euler"]
CONTROL = [
    "conditioning.control=[original_size, crop_top_left, flip]",
    "data.original_sizes=[16, 40]",
    "data.hflip=true",
]
CASES = {
    "dit-class-ddpm": ["model.name=dit", "model.preset=DiT-tiny/4"],
    "dit-disentangled-control": [
        "model.name=dit",
        "model.preset=DiT-tiny/4",
        "conditioning.mechanism=disentangled",
        "data.crop=random_resized",
    ]
    + CONTROL
    + FLOW,
    "pixart-class-flow": ["model.name=pixart", "model.preset=PixArt-alpha-tiny/4", "model.conditioning=class"] + FLOW,
    "mmdit-class-flow": [
        "model.name=mmdit",
        "model.preset=mmDiT-tiny/4",
        "model.conditioning=class",
        "model.qk_norm=true",
    ]
    + FLOW,
    "mmdit-additive-control": [
        "model.name=mmdit",
        "model.preset=mmDiT-tiny/4",
        "model.conditioning=class",
        "conditioning.mechanism=additive",
    ]
    + CONTROL
    + FLOW,
    "unet-class-flow": ["model.name=unet", "model.preset=UNet-tiny", "model.conditioning=class"] + FLOW,
    "mdt-class-masked": [
        "model.name=mdt",
        "model.preset=mDT-v2-tiny/4",
        "model.mask_ratio=0.3",
        "diffusion.min_snr_gamma=5",
    ],
    "dit-adan-ema-halflife": [
        "model.name=dit",
        "model.preset=DiT-tiny/4",
        "train.optimizer=adan",
        "train.betas=[0.98, 0.92, 0.99]",
        "train.ema_halflife_images=64",
    ],
}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def recorded() -> list[dict]:
    """The records in the file, one per environment (none before the first recording)."""
    return json.loads(RECORD.read_text())["records"] if RECORD.is_file() else []


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
    }


def trained_hashes(name: str, root: Path) -> dict[str, str]:
    from ldmkit.checkpoint import latest_checkpoint, load_checkpoint
    from ldmkit.config import load_config
    from ldmkit.training.loop import training_loop

    run = training_loop(load_config(overrides=TINY + SHORT + CASES[name]), root / name, quiet=True)
    state = load_checkpoint(latest_checkpoint(run))
    return {
        f"{part}.{key}": hashlib.sha256(value.contiguous().numpy().tobytes()).hexdigest()
        for part in ("model", "ema")
        for key, value in sorted(state[part].items())
    }


@pytest.fixture
def recorded_threads():
    """2 threads, as recorded, whatever share of the cores this test worker has."""
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(THREADS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_training_is_bit_identical_to_the_record(name, tmp_path, recorded_threads):
    records = recorded()
    record = next((r for r in records if r["environment"] == environment()), None)
    if record is None:
        kinds = "; ".join(str(r["environment"]) for r in records)
        pytest.skip(f"recorded on {kinds}, running on {environment()}: bit equality is not defined")
    got, want = trained_hashes(name, tmp_path), record["cases"][name]
    assert sorted(got) == sorted(want), "the set of tensors changed"
    differ = [k for k in want if got[k] != want[k]]
    assert not differ, f"{len(differ)} tensor(s) differ from the record, first: {differ[:3]}"


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    torch.set_num_threads(2)  # as the test sets it
    with tempfile.TemporaryDirectory() as tmp:
        cases = {name: trained_hashes(name, Path(tmp)) for name in sorted(CASES)}
    # This environment's record replaces its earlier one; other environments' records are kept.
    others = [r for r in recorded() if r["environment"] != environment()]
    RECORD.parent.mkdir(exist_ok=True)
    records = others + [{"environment": environment(), "cases": cases}]
    RECORD.write_text(json.dumps({"records": records}, indent=1, sort_keys=True))
    print(f"recorded {len(cases)} cases for {environment()} in {RECORD} ({len(records)} environment(s))")
