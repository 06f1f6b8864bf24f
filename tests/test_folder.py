"""faceforge.data.folder: image folders (labels, label maps, errors naming paths) and image lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceforge.data.folder import DatasetError, ImageFolderDataset, ImageListDataset, load_label_map


def _save(path: Path, value: int, size: int = 8, fmt: str | None = None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((size, size + 2, 3), value, dtype=np.uint8)
    img[0, 0] = (255, 0, 0)
    Image.fromarray(img).save(path, format=fmt)
    return img


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "faces"
    _save(root / "zed" / "b.png", 10)
    _save(root / "zed" / "a.PNG", 20, fmt="PNG")
    _save(root / "amy" / "1.bmp", 30)
    _save(root / "bob" / "x.jpeg", 40)
    _save(root / "bob" / "y.webp", 50)
    _save(root / "bob" / "z.JPG", 60, fmt="JPEG")
    (root / "bob" / "notes.txt").write_text("not an image")
    (root / "README").write_text("a file beside the identity folders is ignored")
    return root


def test_labels_follow_sorted_folders(tree: Path) -> None:
    ds = ImageFolderDataset(tree)
    assert ds.classes == ["amy", "bob", "zed"]
    assert ds.class_to_label == {"amy": 0, "bob": 1, "zed": 2}
    assert ds.num_classes == 3 and len(ds) == 6
    assert ds.labels.tolist() == [0, 1, 1, 1, 2, 2]
    assert ds.images_per_identity() == {0: 1, 1: 3, 2: 2}
    assert ds.identity_index() == {0: [0], 1: [1, 2, 3], 2: [4, 5]}
    image, label = ds[4]  # zed/a.PNG sorts before zed/b.png
    assert label == 2 and image.dtype == np.uint8 and image.shape == (8, 10, 3)
    assert image[1, 1].tolist() == [20, 20, 20] and image[0, 0].tolist() == [255, 0, 0]
    assert ds[-1][0][1, 1].tolist() == [10, 10, 10]
    shaped = ImageFolderDataset(tree, transform=lambda im: im.shape)
    assert shaped[0] == ((8, 10, 3), 0)


def test_label_map_round_trip(tree: Path, tmp_path: Path) -> None:
    ds = ImageFolderDataset(tree)
    path = tmp_path / "run" / "labels.json"
    ds.save_label_map(path)
    assert load_label_map(path) == ds.class_to_label
    # A later run where a new identity sorts first keeps the old labels through the map.
    _save(tree / "aaa" / "0.png", 70)
    fresh = ImageFolderDataset(tree)
    assert fresh.class_to_label["amy"] == 1
    with pytest.raises(DatasetError, match=r"aaa.*not in the label map"):
        ImageFolderDataset(tree, class_to_label=path)
    (tree / "aaa" / "0.png").unlink()
    (tree / "aaa").rmdir()
    (tree / "bob" / "x.jpeg").unlink()
    again = ImageFolderDataset(tree, class_to_label=str(path))
    assert again.class_to_label == {"amy": 0, "bob": 1, "zed": 2}
    # Folders absent from disk keep their label; num_classes covers the map.
    subset = ImageFolderDataset(tree, class_to_label={"amy": 0, "bob": 1, "zed": 2, "gone": 5})
    assert subset.num_classes == 6
    with pytest.raises(DatasetError, match="both"):
        ImageFolderDataset(tree, class_to_label={"amy": 0, "bob": 0, "zed": 1})


def test_folder_errors_name_the_path(tree: Path, tmp_path: Path) -> None:
    (tree / "empty").mkdir()
    (tree / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=r"empty.*no images"):
        ImageFolderDataset(tree)
    with pytest.raises(DatasetError, match="nowhere.*not found"):
        ImageFolderDataset(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="flat.*no identity folders"):
        ImageFolderDataset(tmp_path / "flat")
    (tree / "empty" / "readme.txt").unlink()
    (tree / "empty").rmdir()
    (tree / "amy" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    ds = ImageFolderDataset(tree)
    with pytest.raises(DatasetError, match=r"broken\.jpg: cannot decode"):
        ds[1]
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(DatasetError, match="label map not found"):
        load_label_map(tmp_path / "missing.json")


def test_image_list(tree: Path, tmp_path: Path) -> None:
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\n\nfaces/amy/1.bmp 3\n{tree / 'zed' / 'b.png'} 0\n")
    ds = ImageListDataset(lst)
    assert len(ds) == 2 and ds.num_classes == 4
    assert ds[0][1] == 3 and ds[0][0].shape == (8, 10, 3)
    assert ds.identity_index() == {0: [1], 3: [0]}
    assert ds.images_per_identity() == {0: 1, 3: 1}
    rooted = ImageListDataset(lst, root=tmp_path)
    assert rooted.samples == ds.samples

    def fails(text: str, pattern: str) -> None:
        lst.write_text(text)
        with pytest.raises(DatasetError, match=pattern):
            ImageListDataset(lst)

    fails("faces/amy/1.bmp 0\nfaces/amy/1.bmp\n", r"list\.txt:2: expected 'path label'")
    fails("faces/amy/1.bmp x\n", r"list\.txt:1: label 'x' is not an int")
    fails("\nfaces/amy/1.bmp -1\n", r"list\.txt:2: negative label")
    fails("faces/amy/nope.png 1\n", r"list\.txt:1: image file not found")
    fails("# only a comment\n", r"list\.txt: no images listed")
    with pytest.raises(DatasetError, match="image list not found"):
        ImageListDataset(tmp_path / "none.txt")
    (tree / "amy" / "bad.png").write_bytes(b"xx")
    lst.write_text("faces/amy/1.bmp 0\nfaces/amy/bad.png 1\n")
    with pytest.raises(DatasetError, match=r"list\.txt:2: .*bad\.png: cannot decode"):
        ImageListDataset(lst)[1]
