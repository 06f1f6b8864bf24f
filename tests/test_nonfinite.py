"""A model that outputs NaN or inf is refused, never a score (issue 25.3): Recognizer.embed / verify / search,
`faceforge embed`, `verify`, `search build` and `search` stop with one line naming the model and the image,
exit 2, and write nothing."""

from __future__ import annotations

from pathlib import Path

import _modelfiles as M  # tests/ is on sys.path
import numpy as np
import pytest
import torch

from faceforge.cli import main
from faceforge.eval.finite import NonFiniteEmbeddingError
from faceforge.deploy.inference import Gallery, Recognizer, load_model
from faceforge.deploy.modelfile import ModelInfo


def _poisoned(tmp_path: Path, value: float) -> Path:
    """model.safetensors of the small backbone with ONE weight of its stem set to ``value``."""
    module = M.backbone()
    with torch.no_grad():
        next(p for p in module.parameters() if p.dim() == 4).view(-1)[0] = value
    return M.write_model(tmp_path / "poisoned", module=module)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_recognizer_refuses_a_non_finite_embedding(tmp_path: Path, value: float):
    weights = _poisoned(tmp_path, value)
    r = load_model(weights)
    faces = M.save_faces(tmp_path / "f", 3)
    pattern = rf"{weights}: the model gave a non-finite \(NaN or inf\) embedding for {faces[0]}"
    with pytest.raises(NonFiniteEmbeddingError, match=pattern):
        r.embed(faces)
    with pytest.raises(NonFiniteEmbeddingError, match=pattern):
        r.verify(faces[0], faces[1])
    with pytest.raises(NonFiniteEmbeddingError, match=rf"{weights}: .* for image 0 \(and 1 more images\)"):
        r.embed(M.faces(2))
    g = Gallery(np.eye(M.DIM, dtype=np.float32)[:2], ["a", "b"], ["a", "b"])
    with pytest.raises(NonFiniteEmbeddingError, match=pattern):
        r.search(g, [faces[0]], force=True)


def test_the_image_named_is_the_one_whose_embedding_is_not_finite():
    """A backend that returns NaN for the third image only, in the second batch of two."""
    info = ModelInfo(backbone="mbf", embedding_size=4, image_size=M.SIZE, flip_test=False)

    def backend(x: np.ndarray) -> np.ndarray:
        out = np.ones((len(x), 4), np.float32)
        out[x[:, 0, 0, 0] > 0.99] = np.nan  # the image whose first pixel is 255
        return out

    crops = np.zeros((4, M.SIZE, M.SIZE, 3), np.uint8)
    crops[2, 0, 0, 0] = 255
    r = Recognizer(backend, info, "stub-model")
    with pytest.raises(NonFiniteEmbeddingError, match=r"^stub-model: .* for image 2; expected finite"):
        r.embed(crops, batch_size=2)
    with pytest.raises(NonFiniteEmbeddingError, match=r"for image 2;"):
        r.embed_crops(crops, batch_size=2)
    assert np.isfinite(r.embed(np.delete(crops, 2, axis=0))).all()


def test_every_command_stops_with_one_line_and_writes_nothing(tmp_path: Path, capsys):
    weights = _poisoned(tmp_path, float("nan"))
    faces = M.save_faces(tmp_path / "gallery", 4, identities=2)
    index = tmp_path / "index"
    Gallery(np.eye(M.DIM, dtype=np.float32)[:2], ["a", "b"], ["a", "b"]).save(index)
    commands = {
        "embed": ["embed", str(weights), str(tmp_path / "gallery"), "--out", str(tmp_path / "e.npy"), "--quiet"],
        "verify": ["verify", str(weights), str(faces[0]), str(faces[1])],
        "search build": ["search", "build", str(weights), str(tmp_path / "gallery"), str(tmp_path / "new"), "--quiet"],
        "search": ["search", str(weights), str(index), str(faces[0]), "--force"],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"faceforge {name.split()[0]}: {weights}: "), err
        assert "non-finite (NaN or inf) embedding for " in err[0] and str(tmp_path / "gallery") in err[0]
        assert "cosine" not in captured.out and "nan" not in captured.out.lower()
    assert not (tmp_path / "e.npy").exists() and not (tmp_path / "e.txt").exists() and not (tmp_path / "new").exists()
