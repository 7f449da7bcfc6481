"""The plain single-network segmentation tool the cascade's folder throughput is compared with (issue 13).

Usage: ``python scripts/plain_segmenter.py IMAGE_DIR OUT_DIR [--size 512] [--seed 0]``

What a user's plain tool does for each image file of ``IMAGE_DIR`` (sorted by name, hidden files skipped), one at a
time, with nothing overlapped:

1. read it (``imaging.read_image``: every format the suite reads, 16-bit PNG included);
2. scale it to 8 bit by its bit depth (``imaging.scale_to_uint8`` with ``intensity_scaling="bit_depth"``, the
   cheapest scaling of the suite) and to [0, 1] float32;
3. resize it to ``--size`` x ``--size`` (OpenCV bilinear, the aspect ratio not kept);
4. run ``segmentation_models_pytorch.Unet("resnet34", encoder_weights=None, in_channels=1, classes=4)``, PyTorch
   eager, fp32, batch 1, in ``torch.inference_mode()``, on the CPU with PyTorch's default thread count;
5. take the argmax over the 4 classes, resize that class map back to the image's full size (nearest neighbour);
6. write it as an 8-bit PNG, ``OUT_DIR/<stem>_seg.png`` (``imaging.write_png``; pixel value = class index).

The weights are random, seeded (``--seed``; no download): speed does not depend on them. ``benchmark.py`` runs this
script as a whole process (start-up included) and takes the per-image time by difference between two folder sizes
(see ``mammo/bench/throughput.py``). Prints the number of images written; exit status 0, or 2 when ``IMAGE_DIR``
holds no image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mammo import imaging  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Command-line flags of the plain tool (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Plain smp.Unet(resnet34) segmentation of every image of a folder.",
                                     add_help=add_help)
    parser.add_argument("image_dir", type=str, help="folder of mammograms")
    parser.add_argument("out_dir", type=str, help="where <stem>_seg.png goes (created if missing)")
    parser.add_argument("--size", type=int, default=512,
                        help="network input size, pixels, square (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    return parser


def segment(model: torch.nn.Module, pixels: np.ndarray, size: int) -> np.ndarray:
    """``(H, W)`` uint8 / uint16 image -> ``(H, W)`` uint8 class map (argmax at ``size`` x ``size``, resized back)."""
    image8 = imaging.scale_to_uint8(pixels, {"intensity_scaling": "bit_depth"})
    small = cv2.resize(image8, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
    with torch.inference_mode():
        logits = model(torch.from_numpy(small)[None, None])
    classes = logits[0].argmax(0).to(torch.uint8).numpy()
    return cv2.resize(classes, (pixels.shape[1], pixels.shape[0]), interpolation=cv2.INTER_NEAREST)


def main(args: argparse.Namespace) -> int:
    """Segment every image of ``args.image_dir``; returns 0, or 2 when there is none."""
    import segmentation_models_pytorch as smp

    files = sorted(p for p in Path(args.image_dir).iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        print(f"error: no image files in {args.image_dir}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model = smp.Unet("resnet34", encoder_weights=None, in_channels=1, classes=4).eval()
    out_dir = Path(args.out_dir)
    for path in files:
        imaging.write_png(out_dir / f"{path.stem}_seg.png", segment(model, imaging.read_image(path).pixels, args.size))
    print(f"{len(files)} class map(s) written to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
