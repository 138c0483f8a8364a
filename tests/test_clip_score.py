"""CLIP score through torchmetrics with a tiny random CLIP, the real CLIP tokenizer vocabulary and a local
folder (what transformers 5 and torchmetrics' name check would otherwise break)."""

import gzip
import importlib.resources
import json
from pathlib import Path

import pytest
import torch

from ldmkit.eval.clip_score import clip_score

transformers = pytest.importorskip("transformers")


def byte_symbols() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's BPE uses: printable bytes map to
    themselves, the other 68 to the characters from U+0100 on, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(
        sorted(
            table.items(),
            key=lambda kv: (kv[0] not in printable, printable.index(kv[0]) if kv[0] in printable else kv[0]),
        )
    )


def clip_tokenizer_files(bpe_gz: str | Path, out_dir: str | Path) -> Path:
    """vocab.json and merges.txt of CLIP's tokenizer, rebuilt from OpenAI's bpe_simple_vocab_16e6.txt.gz (the
    file OpenAI's clip and open_clip ship): the 256 byte symbols, the same with the end-of-word marker, one
    token per merge (48,894 merges), then <|startoftext|> and <|endoftext|> (49,408 tokens)."""
    merges = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(byte_symbols().values())
    vocab = (
        symbols
        + [s + "</w>" for s in symbols]
        + ["".join(m.split()) for m in merges]
        + ["<|startoftext|>", "<|endoftext|>"]
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out_dir


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    folder = tmp_path_factory.mktemp("tiny-clip")  # no "openai" in the path: torchmetrics alone would refuse it
    files = clip_tokenizer_files(
        importlib.resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz", folder / "tok"
    )
    tokenizer = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"))
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's ids
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder / "model")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder / "model")
    return folder / "model"


def test_clip_score_matches_the_definition(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    images = torch.rand(6, 3, 32, 32) * 2 - 1
    prompts = [
        "a handwritten digit seven",
        "a photo of a cat",
        "a red square",
        "",
        "two dogs",
        "a handwritten digit one",
    ]
    score = clip_score(images, prompts, str(tiny_clip), batch=4)
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    with torch.no_grad():
        img = model.get_image_features(
            pixel_values=processor(images=list(pixels), return_tensors="pt")["pixel_values"]
        ).pooler_output
        tok = processor(text=prompts, return_tensors="pt", padding=True)
        txt = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
    expected = max(float((100 * torch.nn.functional.cosine_similarity(img, txt)).mean()), 0.0)
    assert score == pytest.approx(expected, abs=1e-4)
    assert 0 <= score <= 100


def test_missing_clip_model_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="cannot load the CLIP model"):
        clip_score(torch.zeros(1, 3, 8, 8), ["x"], str(tmp_path / "nothing"))


@pytest.mark.slow
def test_eval_of_a_text_run_reports_clip_score_for_a_prompt_file(tiny_clip, tmp_path):
    import json

    from conftest import TINY

    from ldmkit.cli import main
    from ldmkit.config import load_config
    from ldmkit.data.shards import write_mnist_caption_shards
    from ldmkit.training.loop import training_loop

    write_mnist_caption_shards(tmp_path / "shards", load_config().data, "held_out", shard_size=100)
    cfg = load_config(
        overrides=TINY
        + [
            "data.name=shards",
            f"data.path={tmp_path}/shards/mnist-{{00000..00004}}.tar",
            "data.label_field=label",
            "data.crop=none",
            "text.encoder=minilm",
            "text.max_length=16",
            "model.conditioning=pooled_text",
            "train.total_images=32",
        ]
    )
    run = training_loop(cfg, tmp_path / "run", quiet=True)
    (tmp_path / "prompts.txt").write_text("a handwritten digit three\na handwritten digit eight\n")
    assert (
        main(
            [
                "eval",
                str(run),
                "--num",
                "4",
                "--steps",
                "2",
                "--metrics",
                "none",
                "--prompts",
                str(tmp_path / "prompts.txt"),
                "--clip-model",
                str(tiny_clip),
                "--json",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0 <= metrics["clip_score"] <= 100
    assert metrics["clip_model"] == str(tiny_clip)
    from ldmkit.eval.evaluate import eval_prompts

    cfg.eval.prompts_file = f"{tmp_path}/shards/mnist-00000.tar"  # a validation shard set's captions
    prompts = eval_prompts(cfg, torch.arange(3))
    assert len(prompts) == 3
    assert all(p.startswith("a handwritten digit ") for p in prompts)
