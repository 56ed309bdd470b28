"""Small retrieval data sets of real images that exist offline, and a backbone pretrained on one.

Three commands, each deterministic (seeded) and rerunnable:

``digits OUT``
    scikit-learn's bundled handwritten digits (UCI ML hand-written digits, 1,797 images of 8×8
    pixels, 10 classes, BSD-3-Clause with scikit-learn): ``OUT/train/<digit>/`` holds the digits
    0–4 and ``OUT/test/<digit>/`` the digits 5–9, so training and test classes are disjoint.
``glyphs OUT``
    Characters rendered from the fonts matplotlib ships inside its wheel (DejaVu Sans, Sans Mono
    and Serif in four styles each, STIX General in four: 16 faces, Bitstream Vera / DejaVu and
    SIL OFL 1.1 licences), two renders per face with a random rotation, size and shift, 32×32
    grey. A class is one character covered by every face; the classes are shuffled with a fixed
    seed and the first ``--classes`` (200) make the retrieval set: half train, half test.
``pretrain OUT``
    The *other* glyph classes (disjoint from the retrieval set's) as a classification set
    (``OUT/images/``), and a ``small_cnn`` backbone trained on it with softmax cross-entropy,
    saved as ``OUT/backbone.pt``: a backbone that has already learned the domain, as an
    ImageNet-pretrained one has for CUB, for ``--set model.pretrained=OUT/backbone.pt``.

Then, e.g.::

    python benchmarks/real_images.py glyphs data/glyphs
    python benchmarks/real_images.py pretrain data/glyph_backbone
    python benchmarks/ablate.py benchmarks/recipes/glyphs.yaml --data-root data/glyphs \\
        --metric proxy_anchor --jobs 2
    python benchmarks/ablate.py benchmarks/recipes/glyphs.yaml --data-root data/glyphs \\
        --set model.pretrained=data/glyph_backbone/backbone.pt --set optim.metric_lr=5e-4
"""

import argparse
import random
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

SIZE = 32
#: The faces of matplotlib's bundled fonts that cover whole alphabets (not the symbol-only STIX
#: size variants, the Display faces of a few glyphs, or the Computer Modern subsets).
FACES = [
    f"DejaVu{family}{style}.ttf"
    for family, styles in (
        ("Sans", ("", "-Bold", "-Oblique", "-BoldOblique")),
        ("SansMono", ("", "-Bold", "-Oblique", "-BoldOblique")),
        ("Serif", ("", "-Bold", "-Italic", "-BoldItalic")),
    )
    for style in styles
] + [f"STIXGeneral{style}.ttf" for style in ("", "Bol", "Italic", "BolIta")]
RENDERS_PER_FACE = 2


def write_png(array: np.ndarray, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def digits(out: Path):
    """scikit-learn's digits, 0–4 to train/, 5–9 to test/ (8×8, grey levels 0–16 → 0–255)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    counts = {}
    for image, label in zip(data.images, data.target):
        split = "train" if label < 5 else "test"
        index = counts[label] = counts.get(label, -1) + 1
        write_png(
            (image * (255 / 16)).round().astype(np.uint8),
            out / split / str(label) / f"{index:04d}.png",
        )
    return {
        split: sum(n + 1 for d, n in counts.items() if (d < 5) == (split == "train"))
        for split in ("train", "test")
    }


def font_paths() -> list[Path]:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = [folder / name for name in FACES]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        sys.exit(f"matplotlib's bundled fonts lack {', '.join(missing)}: pip install matplotlib")
    return paths


def glyph_classes() -> list[str]:
    """Every printable, non-space, non-combining character below U+2000 that all faces cover,
    shuffled with seed 0 (the split between retrieval and pretraining classes)."""
    from matplotlib import ft2font

    covered = None
    for path in font_paths():
        codes = set(ft2font.FT2Font(str(path)).get_charmap())
        covered = codes if covered is None else covered & codes
    characters = sorted(
        chr(code)
        for code in covered
        if code < 0x2000
        and chr(code).isprintable()
        and not chr(code).isspace()
        and not unicodedata.category(chr(code)).startswith(("M", "C"))
    )
    random.Random(0).shuffle(characters)
    return characters


def render(character: str, font_path: Path, rng: random.Random) -> np.ndarray:
    """One 32×32 render: white on black, a random size (18–26 px), rotation (±12°) and shift."""
    font = ImageFont.truetype(str(font_path), rng.randint(18, 26))
    canvas = Image.new("L", (2 * SIZE, 2 * SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), character, font=font)
    x = SIZE - (left + right) / 2 + rng.uniform(-2, 2)
    y = SIZE - (top + bottom) / 2 + rng.uniform(-2, 2)
    draw.text((x, y), character, fill=255, font=font)
    canvas = canvas.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR)
    return np.asarray(canvas.crop((SIZE // 2, SIZE // 2, SIZE // 2 + SIZE, SIZE // 2 + SIZE)))


def class_name(character: str) -> str:
    """A folder name for a character: its code point (names such as '/' or '.' would not do)."""
    return f"U+{ord(character):04X}"


def write_glyphs(out: Path, characters: list[str], split_of, seed: int) -> int:
    """Renders every character in every face, RENDERS_PER_FACE times; `split_of(class number,
    render number)` names the subfolder of each image. Blank renders (a face's empty glyph) are
    skipped. Returns the number of images written."""
    rng, written = random.Random(seed), 0
    for number, character in enumerate(characters):
        index = 0
        for font_path in font_paths():
            for _ in range(RENDERS_PER_FACE):
                image = render(character, font_path, rng)
                if image.max() == 0:
                    continue
                path = out / split_of(number, index) / class_name(character) / f"{index:03d}.png"
                write_png(image, path)
                index, written = index + 1, written + 1
    return written


def glyphs(out: Path, classes: int):
    characters = glyph_classes()[:classes]
    half = len(characters) // 2
    return write_glyphs(out, characters, lambda number, _: "train" if number < half else "test", 1)


def pretrain(out: Path, classes: int, epochs: int, seed: int):
    """The glyph classes after the retrieval set's, rendered (one render in eight held out), and a
    small CNN trained to classify them; its backbone's weights go to OUT/backbone.pt."""
    from torch.utils.data import DataLoader

    from gca_pyg.backbones import build_backbone
    from gca_pyg.data.folder import ImageFolderByClass
    from gca_pyg.data.transforms import test_transform, train_transform

    characters = glyph_classes()[classes:]
    images = out / "images"
    if not images.is_dir():
        write_glyphs(images, characters, lambda _, index: "test" if index % 8 == 7 else "train", 2)
    torch.manual_seed(seed)
    train = ImageFolderByClass(images, "train", train_transform(SIZE, (0.5, 1.0)))
    held_out = ImageFolderByClass(images, "test", test_transform(SIZE, SIZE))
    backbone = build_backbone("small_cnn", "none")
    head = torch.nn.Linear(backbone.out_features, train.num_classes)
    model = torch.nn.Sequential(backbone, head)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    loader = DataLoader(train, batch_size=128, shuffle=True, drop_last=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, 2e-3, total_steps=epochs * len(loader)
    )
    for epoch in range(epochs):
        model.train()
        started, total, count = time.perf_counter(), 0.0, 0
        for batch, labels in loader:
            loss = torch.nn.functional.cross_entropy(model(batch), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, count = total + loss.item(), count + 1
        model.eval()
        with torch.no_grad():
            correct = sum(
                int((model(batch).argmax(1) == labels).sum())
                for batch, labels in DataLoader(held_out, batch_size=512)
            )
        print(
            f"epoch {epoch + 1}/{epochs}: loss {total / count:.3f}, held-out accuracy "
            f"{100 * correct / len(held_out):.1f} % ({time.perf_counter() - started:.0f} s)"
        )
    torch.save(backbone.state_dict(), out / "backbone.pt")
    return train.num_classes, len(train), len(held_out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("digits", "glyphs", "pretrain"))
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument(
        "--classes", type=int, default=200, help="glyph classes of the retrieval set (default 200)"
    )
    parser.add_argument("--epochs", type=int, default=12, help="pretraining epochs (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="pretraining seed (default 0)")
    args = parser.parse_args(argv)
    if args.what != "pretrain" and args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"{args.out} is not empty: give a new folder")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "digits":
        counts = digits(args.out)
        print(
            f"{args.out}: {counts['train']} training images of digits 0-4, {counts['test']} "
            "test images of digits 5-9"
        )
    elif args.what == "glyphs":
        count = glyphs(args.out, args.classes)
        print(
            f"{args.out}: {count} images of {args.classes} characters, {len(FACES)} faces, "
            f"first half of the classes in train/, second half in test/"
        )
    else:
        classes, train, held_out = pretrain(args.out, args.classes, args.epochs, args.seed)
        print(
            f"{args.out / 'backbone.pt'}: small_cnn trained to classify {classes} glyph classes "
            f"({train} images, {held_out} held out), none of them in the retrieval set"
        )


if __name__ == "__main__":
    main()
