"""ldmkit: train, sample and evaluate latent diffusion models apples-to-apples.

    import ldmkit
    run = ldmkit.train("demo/mnist_dit", overrides=["train.total_images=2048"], out="runs/mine")
    pipe = ldmkit.load(run)                        # a run, checkpoint, exported or diffusers folder
    images = pipe(class_labels=[3, 7], num_inference_steps=12, guidance_scale=3)
    metrics = ldmkit.evaluate(run, num_images=500)

The names below load on first use, so `import ldmkit` (and the command line) stays light; docs/python.md.
"""

import logging


class _QuietTorchao(logging.Filter):
    """With torchao installed (the fp8 extra) diffusers imports it on every model import, and two warnings follow
    that concern neither ldmkit nor its users: torch's about how torchao registers enums, and diffusers' about
    loading torchao-quantized diffusers checkpoints, which ldmkit never does."""

    NOISE = ("is an Enum subclass and is now natively supported", "Unable to import `torchao` Tensor objects")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in str(record.msg) for text in self.NOISE)


for _name in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).addFilter(_QuietTorchao())

__version__ = "0.1.0"
__all__ = ["Pipeline", "evaluate", "load", "train", "__version__"]


def __getattr__(name: str):
    if name in ("Pipeline", "evaluate", "load", "train"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ldmkit' has no attribute {name!r}")
