"""The data seam (issue 27): ``data: {name, kwargs}`` checked against the source's factory before step 1, the old
flat keys mapped into ``data.kwargs``, one ``open_source`` rule for train, eval and pack, the public item contract
(``faceforge.data.TrainingSet`` / ``TrainImages``) and an out-of-tree source trained through ``faceforge train``.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from faceforge.cli import main
from faceforge.data import DecodedImages, SourceError, TrainImages, TrainingSet, open_source
from faceforge.data import recordio
from faceforge.data.pack import inspect_path
from faceforge.data.synthetic import render_images
from faceforge.eval.sets import open_images
from faceforge.core import config as config_module
from faceforge.train.config import ConfigError, config_from_dict, load_config, to_dict
from faceforge.train.data import DATASETS, VERIFICATION_SETS, build_dataset, build_unlabelled, build_verification_sets

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16


def _config(output: Path, data: dict[str, Any], **sections: Any) -> dict[str, Any]:
    return {
        "seed": 3, "output": str(output),
        "model": {"backbone": "_train_worker:TinyNet", "embedding_size": 8},
        "head": {"name": "arcface", "kwargs": {"s": 16.0}},
        "data": {"image_size": SIZE, "batch_size": 8, **data},
        "optim": {"name": "sgd", "lr": 0.1},
        "train": {"steps": 2, "log_every": 1, "checkpoint_every": 0, "progress": False},
        **sections,
    }


def _write(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def _error_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """`faceforge ARGV` exits 2 with one error line (deprecation notes and log lines aside); returns it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("faceforge ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------- data.kwargs checked


def test_a_wrong_data_kwarg_is_one_line_naming_it_before_the_run_folder(tmp_path: Path, capsys) -> None:
    config = _write(tmp_path / "c.yaml", _config(tmp_path / "run", {"name": "synthetic",
                                                                     "kwargs": {"num_identitees": 3}}))
    line = _error_line(capsys, ["train", str(config)])
    assert "data.kwargs.num_identitees: not an argument of data source 'synthetic'" in line
    assert "expected one of: cache, difficulty, eval_identities, eval_pairs, images_per_identity, num_identities" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"num_identities": "abc"}, "data.kwargs.num_identities = 'abc': expected int"),
    ({"num_identities": 2.5}, "data.kwargs.num_identities = 2.5: expected int"),
    ({"cache": 1}, "data.kwargs.cache = 1: expected bool"),
    ({"num_identities": 0}, "data.kwargs.num_identities = 0: expected an int >= 1"),
    ({"eval_pairs": -1}, "data.kwargs.eval_pairs = -1: expected an int >= 0"),
    ({"image_size": 32}, "data.kwargs.image_size: set by the trainer from data.image_size"),
    ({"seed": 1}, "data.kwargs.seed: set by the trainer from seed"),
])
def test_data_kwargs_types_ranges_and_run_facts_are_checked_when_read(tmp_path: Path, kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        config_from_dict(_config(tmp_path, {"name": "synthetic", "kwargs": kwargs}), "<test>")


def test_a_source_without_kwargs_refuses_any(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.kwargs\.eval_pairs: not an argument of data source 'recordio'"):
        config_from_dict(_config(tmp_path, {"name": "recordio", "path": "x", "kwargs": {"eval_pairs": 0}}), "<test>")


def test_kwargs_are_completed_with_the_factory_defaults_and_saved(tmp_path: Path) -> None:
    cfg = config_from_dict(_config(tmp_path, {"name": "synthetic", "kwargs": {"num_identities": 5}}), "<test>")
    assert cfg.data.kwargs == {"num_identities": 5, "images_per_identity": 20, "difficulty": 1.0, "cache": False,
                               "eval_pairs": 1000, "eval_identities": 200}
    assert config_from_dict(to_dict(cfg), "<saved>") == cfg  # config.yaml / the checkpoint read back


def test_factories_take_plain_arguments_never_the_config() -> None:
    for registry in (DATASETS, VERIFICATION_SETS):
        for name in registry.names():
            params = inspect.signature(registry.get(name)).parameters.values()
            assert all(p.kind is p.KEYWORD_ONLY for p in params), (name, list(params))
            assert not {"cfg", "config"} & {p.name for p in params}, name


# ---------------------------------------------------------------------------------------------- the old flat keys


def test_old_flat_keys_give_the_same_data_as_kwargs(tmp_path: Path) -> None:
    flat = {"name": "synthetic", "num_identities": 6, "images_per_identity": 3, "difficulty": 0.5,
            "eval_pairs": 10, "eval_identities": 4}
    new = {"name": "synthetic", "kwargs": {k: v for k, v in flat.items() if k != "name"}}
    old_cfg = config_from_dict(_config(tmp_path, flat), "<old>")
    new_cfg = config_from_dict(_config(tmp_path, new), "<new>")
    assert old_cfg == new_cfg  # the same config, so the same sampler and batches over the same items
    old_ds, new_ds = build_dataset(old_cfg), build_dataset(new_cfg)
    assert len(old_ds) == len(new_ds) == 18 and old_ds.num_classes == new_ds.num_classes == 6
    from faceforge.data.samplers import SAMPLERS, SamplerContext

    def first_batch(ds: Any) -> Any:
        context = SamplerContext(dataset=ds, batch_size=8, world_size=1, rank=0, seed=3, grad_accum=1,
                                 micro_per_epoch=2)
        return next(iter(SAMPLERS.build("epoch", context=context).batches(epoch=0, start_micro=0)))

    old_batch, new_batch = first_batch(old_ds), first_batch(new_ds)
    assert torch.equal(old_batch.images, new_batch.images) and torch.equal(old_batch.labels, new_batch.labels)
    assert [old_ds[i][1] for i in range(18)] == [new_ds[i][1] for i in range(18)]
    (old_images, old_same), = build_verification_sets(old_cfg).values()
    (new_images, new_same), = build_verification_sets(new_cfg).values()
    assert np.array_equal(old_images, new_images) and np.array_equal(old_same, new_same) and len(new_same) == 10


def test_a_flat_key_is_noted_once_and_refused_by_its_own_name(tmp_path: Path, caplog, monkeypatch) -> None:
    monkeypatch.setattr(config_module, "_noted_flat_keys", set())
    with caplog.at_level(logging.WARNING, logger="faceforge"):
        for _ in range(2):
            config_from_dict(_config(tmp_path, {"num_identities": 30}), "<test>")
    notes = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert notes == ["<test>: data.num_identities is deprecated; it now reads data.kwargs.num_identities"]
    with pytest.raises(ConfigError, match=r"<test>: data\.num_identities = 'abc': expected int"):
        config_from_dict(_config(tmp_path, {"num_identities": "abc"}), "<test>")
    with pytest.raises(ConfigError, match=r"data\.num_identities = 0: expected an int >= 1"):
        config_from_dict(_config(tmp_path, {"num_identities": 0}), "<test>")


def test_a_flat_key_on_the_command_line_overrides_the_config_kwargs(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path / "c.yaml", _config(tmp_path / "run", {"name": "synthetic",
                                                                   "kwargs": {"num_identities": 5}}))
    assert load_config(path, ["data.num_identities=30"]).data.kwargs["num_identities"] == 30
    line = _error_line(capsys, ["train", str(path), "data.num_identities=abc"])
    assert "data.num_identities = 'abc': expected int" in line and not (tmp_path / "run").exists()


def test_a_flat_key_the_source_never_took_is_dropped_with_a_note(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="faceforge"):
        cfg = config_from_dict(_config(tmp_path, {"name": "recordio", "path": "x", "eval_pairs": 0,
                                                  "num_identities": 1000}), "<test>")
    assert cfg.data.kwargs == {}
    ignored = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    # eval_pairs: 0 was ignored by recordio before, and now says so; num_identities holds its old default (a config
    # saved by an older version lists every field) and goes silently
    assert ignored == ["<test>: data.eval_pairs = 0 is ignored: data source 'recordio' does not take it"]


# ---------------------------------------------------------------------------------------------- open_source


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    """``x.rec``/``x.idx`` beside a folder ``x`` (one identity), ``only_rec.rec``, ``pairs.bin``, ``folder/``."""
    faces = render_images([0, 0, 1, 1], [0, 1, 0, 1], image_size=SIZE)
    recordio.write(tmp_path / "x", zip(list(faces), [0, 0, 1, 1]))
    recordio.write(tmp_path / "only_rec", zip(list(faces), [0, 0, 1, 1]))
    (tmp_path / "only_rec.idx").unlink()
    for folder in (tmp_path / "x" / "a", tmp_path / "folder" / "a"):
        folder.mkdir(parents=True)
        from PIL import Image

        Image.fromarray(faces[0]).save(folder / "0.png")
    (tmp_path / "pairs.bin").write_bytes(b"\x80\x04")
    return tmp_path


def test_open_source_decides_each_format_by_one_rule(sources: Path) -> None:
    x = str(sources / "x")
    assert open_source(x).format == "rec" and open_source(x).path == x  # a .rec prefix wins over a folder beside it
    assert open_source(x + ".rec") == open_source(x + ".idx") == open_source(x)
    assert open_source(sources / "only_rec").format == "rec"  # the missing .idx is the reader's error, naming it
    assert open_source(sources / "folder").format == "folder"
    assert open_source(sources / "pairs.bin").format == "bin"
    with pytest.raises(SourceError, match=r"nothing: not found as an image folder, a \.rec/\.idx prefix or a \.bin"):
        open_source(sources / "nothing")


def test_train_eval_and_pack_read_a_path_alike(sources: Path, tmp_path: Path) -> None:
    """``x`` is both a folder (1 image) and a ``.rec`` prefix (4 images): all three read the ``.rec`` (before, pack
    read the folder, eval needed both files and the trainer only the ``.rec``)."""
    x = str(sources / "x")
    assert inspect_path(x, progress=False).num_images == 4
    assert len(open_images(x)) == 4 and len(open_images(x + ".idx")) == 4
    cfg = config_from_dict(_config(tmp_path / "run", {"unlabelled": x}), "<test>")
    assert len(build_unlabelled(cfg)) == 4
    with pytest.raises(ConfigError, match=r"data\.unlabelled = .*pairs\.bin.*a \.bin holds verification pairs"):
        build_unlabelled(config_from_dict(_config(tmp_path / "run", {"unlabelled": str(sources / "pairs.bin")}), "<t>"))


# ---------------------------------------------------------------------------------------------- the item contract


def test_the_built_in_and_the_example_sources_meet_the_public_contract(tmp_path: Path) -> None:
    from _extending_data import StripeImages, Stripes

    cfg = config_from_dict(_config(tmp_path, {"name": "synthetic", "kwargs": {"num_identities": 2,
                                                                              "images_per_identity": 2}}), "<t>")
    assert isinstance(build_dataset(cfg), TrainingSet)
    stripes = Stripes(image_size=SIZE, seed=0, classes=3, per_class=2)
    assert isinstance(stripes, TrainImages) and isinstance(stripes, TrainingSet)
    assert isinstance(StripeImages(3, 2, SIZE, 0), DecodedImages)
    x, label = stripes[5]
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32 and label == 2
    image, _ = stripes.dataset[5]
    torch.testing.assert_close(x, torch.from_numpy((image.astype(np.float64) - 127.5) / 127.5).permute(2, 0, 1).float(),
                               rtol=0, atol=0)  # (x - 127.5) / 127.5 of integers: exact in float32


def test_an_out_of_tree_source_trains_through_faceforge_train(tmp_path: Path, capsys) -> None:
    data = {"name": "_extending_data:Stripes", "kwargs": {"classes": 4, "per_class": 4}}
    config = _write(tmp_path / "c.yaml", _config(tmp_path / "run", data))
    assert main(["train", str(config)]) == 0
    assert (tmp_path / "run" / "last.pt").is_file()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert saved["name"] == "_extending_data:Stripes" and saved["kwargs"] == {"classes": 4, "per_class": 4}
    capsys.readouterr()
    bad = _write(tmp_path / "bad.yaml", _config(tmp_path / "bad", {**data, "kwargs": {"clases": 4}}))
    line = _error_line(capsys, ["train", str(bad)])
    assert "data.kwargs.clases: not an argument of data source '_extending_data:Stripes'; expected one of: " \
           "classes, per_class" in line


def test_a_kwargs_override_beats_the_config_files_flat_key(tmp_path: Path, caplog) -> None:
    path = _write(tmp_path / "c.yaml", _config(tmp_path / "run", {"name": "synthetic", "num_identities": 5}))
    assert load_config(path, ["data.kwargs.num_identities=30"]).data.kwargs["num_identities"] == 30
    assert load_config(path, ["data.num_identities=31"]).data.kwargs["num_identities"] == 31
    with caplog.at_level(logging.WARNING, logger="faceforge"):  # both in one file: the flat key wins, and says so
        both = _config(tmp_path, {"name": "synthetic", "num_identities": 5, "kwargs": {"num_identities": 6}})
        assert config_from_dict(both, "<test>").data.kwargs["num_identities"] == 5
    assert "<test>: data.num_identities = 5 overrides data.kwargs.num_identities = 6" in caplog.text
