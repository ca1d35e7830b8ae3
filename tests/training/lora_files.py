"""What a LoRA file holds and what ``load_lora_weights`` made of it (tests of the LoRA family, issue 18)."""


def lora_modules(path) -> set[str]:
    """The UNet modules a LoRA file holds weights for (``unet.X.lora_A.weight`` -> ``X``)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k.removeprefix("unet.").rsplit(".lora", 1)[0] for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def loaded_modules(unet, adapter: str) -> set[str]:
    """The UNet modules that ``load_lora_weights`` gave the adapter ``adapter``."""
    return {name for name, m in unet.named_modules() if adapter in getattr(m, "lora_A", {})}
