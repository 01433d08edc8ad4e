"""Real photos that ship inside pip packages and load offline: the itsd-tiny recipe's only data.

scikit-image's bundled data (colour and grey), scikit-learn's `load_sample_images()` and matplotlib's sample
data. Each loader returns uint8 HxWx3 RGB (a grey photo in all three channels); `write_photos` saves the
chosen ones as PNG files for `itsd prepare`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        image = getattr(skimage.data, name)()
        return np.dstack([image] * 3) if image.ndim == 2 else image  # a grey photo as RGB

    return load


def _motorcycle() -> np.ndarray:
    import skimage.data

    return skimage.data.stereo_motorcycle()[0]  # the left view of the stereo pair


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_images

        found = load_sample_images()
        return next(im for im, path in zip(found.images, found.filenames, strict=True) if Path(path).stem == name)

    return load


def _grace_hopper() -> np.ndarray:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as file:
        return np.asarray(Image.open(file).convert("RGB"))


PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    **{
        name: _skimage(name)
        for name in (
            "astronaut",
            "chelsea",
            "coffee",
            "rocket",
            "hubble_deep_field",
            "immunohistochemistry",
            "retina",
            # grey photos: more edges and textures to learn restoration from (colour comes from the input)
            "camera",
            "brick",
            "grass",
            "coins",
        )
    },
    "motorcycle": _motorcycle,
    "china": _sklearn("china"),
    "flower": _sklearn("flower"),
    "grace_hopper": _grace_hopper,
}


def write_photos(names: Iterable[str], folder: Path) -> list[Path]:
    """Save the named photos as `<folder>/<name>.png`; an unknown name is a KeyError naming the known ones."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        if name not in PHOTOS:
            raise KeyError(f"no sample photo {name!r}; known: {', '.join(PHOTOS)}")
        path = folder / f"{name}.png"
        Image.fromarray(np.asarray(PHOTOS[name](), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths
