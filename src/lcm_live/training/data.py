"""Training data as latents: images (the shapes generator, or a folder of image + caption pairs) encoded
once by the VAE into posterior mean and std, then sampled (z = mean + std * noise) each step.

Encoding once instead of every step is what makes CPU training affordable: the VAE encoder at 64x64
costs more than the whole small UNet step at 16x16. A folder holds ``NAME.png|jpg|webp`` with
``NAME.txt`` (the caption) beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lcm_live.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class LatentPool:
    mean: object  # torch.Tensor (N, C, h, w), already multiplied by the VAE's scaling_factor
    std: object  # torch.Tensor, same shape and scale
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, rng: np.random.Generator, batch_size: int, generator=None):
        """(latents, captions): a random batch, each latent a fresh sample of its posterior."""
        import torch

        idx = torch.from_numpy(rng.integers(0, len(self), size=batch_size))
        noise = torch.randn(self.mean[idx].shape, generator=generator)
        return self.mean[idx] + self.std[idx] * noise, [self.captions[i] for i in idx.tolist()]


def encode_images(vae, images: np.ndarray, batch_size: int = 128):
    """uint8 (N, H, W, 3) -> (mean, std) scaled latents on the CPU, no gradient (encoded on ``vae.device``)."""
    import torch

    from lcm_live.training.shapes import to_tensor

    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            dist = vae.encode(to_tensor(images[i:i + batch_size]).to(vae.device)).latent_dist
            means.append((dist.mean * vae.config.scaling_factor).cpu())
            stds.append((dist.std * vae.config.scaling_factor).cpu())
    return torch.cat(means), torch.cat(stds)


def shapes_pool(vae, n: int, seed: int = 1, outline: bool = False) -> LatentPool:
    """``n`` shapes images encoded once; ``outline``: the outlined variant (captions end ", outlined")."""
    from lcm_live.training.shapes import sample_batch

    means, stds, captions = [], [], []
    for start in range(0, n, 1024):  # chunks keep drawing memory small
        images, specs = sample_batch(seed * 1_000_003 + start, min(1024, n - start), outline=outline)
        m, s = encode_images(vae, images)
        means.append(m)
        stds.append(s)
        captions += [spec.caption for spec in specs]
    import torch

    return LatentPool(torch.cat(means), torch.cat(stds), captions)


def folder_pool(vae, folder: str | Path, resolution: int) -> LatentPool:
    """Image + caption pairs from ``folder``, centre-cropped and resized to ``resolution``."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--data {folder}: not a folder; give 'shapes' or a folder of image + .txt caption pairs",
                        field="data")
    pairs = [(p, p.with_suffix(".txt")) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    pairs = [(img, txt) for img, txt in pairs if txt.exists()]
    if not pairs:
        raise UserError(f"--data {folder}: no image with a caption beside it (NAME.png + NAME.txt)", field="data")
    images, captions = [], []
    for img_path, txt_path in pairs:
        img = Image.open(img_path).convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        images.append(np.asarray(img))
        captions.append(txt_path.read_text().strip())
    mean, std = encode_images(vae, np.stack(images))
    return LatentPool(mean, std, captions)


def make_pool(vae, data: str, *, n_shapes: int, resolution: int, seed: int = 1) -> LatentPool:
    """``data``: "shapes" (the generator, ``n_shapes`` images), "shapes-outlined" (its outlined variant),
    "shapes-mixed" (half of each, the outlined half from another seed) or a folder of pairs."""
    if data in ("shapes", "shapes-outlined"):
        return shapes_pool(vae, n_shapes, seed=seed, outline=data == "shapes-outlined")
    if data == "shapes-mixed":
        import torch

        half = n_shapes // 2
        a = shapes_pool(vae, n_shapes - half, seed=seed)
        b = shapes_pool(vae, half, seed=seed + 1000, outline=True)
        return LatentPool(torch.cat([a.mean, b.mean]), torch.cat([a.std, b.std]), a.captions + b.captions)
    return folder_pool(vae, data, resolution)
