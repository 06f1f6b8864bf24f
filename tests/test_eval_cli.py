"""`faceforge eval`: results.md / results.json / plots, cached embeddings, --compare; IJB, identification with
distractors and retrieval on tiny generated data, every number recomputed in the test."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import _eval_data as E  # tests/ is on sys.path
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import faceforge.eval.evaluate as evaluate
from faceforge.cli import main
from faceforge.data.pairs import write_bin
from faceforge.data.synthetic import synthetic_pairs
from faceforge.cli.demo import run_demo
from faceforge.eval.verify import evaluate_scores, pair_scores
from faceforge.eval.evaluate import EVAL_FARS
from faceforge.core.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """A tiny trained checkpoint and a 32-pair .bin set: (checkpoint, bin, issame)."""
    root = tmp_path_factory.mktemp("eval_cli")
    run_demo(tiny=True, overrides=[f"output={root / 'run'}", "train.progress=false"])
    images, issame = synthetic_pairs(32, num_identities=200, image_size=32, split="test")
    write_bin(root / "pairs.bin", images, issame)
    return root / "run" / "last.pt", root / "pairs.bin", np.asarray(issame, dtype=bool)


def test_eval_writes_every_report_and_reuses_the_embeddings(
    trained: tuple[Path, Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ckpt, bin_path, issame = trained
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--bin", str(bin_path), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^\| last\.pt on pairs +\| \d+\.\d\d ±", text, re.M)
    assert not (out / "roc_eval.png").exists()  # the compatibility copy is gone
    for name in ("results.md", "results.json", "roc.png", "hist_pairs.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert "last.pt on pairs" in (out / "results.md").read_text()

    data = json.loads((out / "results.json").read_text())
    (rec,) = data["results"]
    assert rec["set"] == "pairs" and rec["checkpoint"] == "last.pt" and rec["cached"] is False
    assert rec["pairs"] == len(issame)
    emb = np.load(rec["embeddings"])
    assert Path(rec["embeddings"]).parent == out and emb.shape[0] == 2 * len(issame)
    # the cached embeddings themselves, from the .bin's images and the checkpoint's backbone written out here in
    # float64: normalize(f(x) + f(flip(x))) with x = (image - 127.5) / 127.5. The CLI's float32 forward agrees to
    # ~1e-6 per unit-vector component (a few 2^-24 per layer); 1e-4 sees a wrong flip, scale or model.
    import torch

    from faceforge.build import load_backbone
    from faceforge.data.pairs import load_bin

    images, _ = load_bin(bin_path)
    net = load_backbone(ckpt)[0].double().eval()
    x = (torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).double() - 127.5) / 127.5
    with torch.no_grad():
        f = net(x) + net(x.flip(-1))
    f = (f / f.norm(dim=1, keepdim=True)).numpy()
    np.testing.assert_allclose(emb, f, rtol=0, atol=1e-4)
    scores = np.einsum("nd,nd->n", f[0::2], f[1::2])
    genuine, impostor = scores[issame][:, None], scores[~issame][None, :]
    assert np.abs(genuine - impostor).min() > 1e-5  # no near-tie that float32 could order otherwise
    assert rec["auc"] == pytest.approx(float(np.mean(genuine > impostor)), abs=1e-12)
    expect = evaluate_scores(pair_scores(emb), issame, fars=EVAL_FARS)
    for key in ("accuracy", "accuracy_std", "best_threshold_accuracy", "threshold", "eer", "auc"):
        assert rec[key] == pytest.approx(getattr(expect, key), abs=1e-12), key
    assert set(rec["tar_at_far"]) == {"1e-04", "1e-03", "1e-02", "1e-01"}
    for far, tar in expect.tar_at_far.items():
        assert rec["tar_at_far"][f"{far:.0e}"] == pytest.approx(tar, abs=1e-12)

    # a re-run scores from the cache: the model must not even be built
    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built although the embeddings are cached")

    monkeypatch.setattr(evaluate._Checkpoint, "model", no_model)
    results = evaluate.evaluate_checkpoint(ckpt, output=out, bins=[str(bin_path)])
    assert "cached" in capsys.readouterr().out
    assert results["pairs"].result.accuracy == rec["accuracy"]
    again = json.loads((out / "results.json").read_text())["results"][0]
    assert again["cached"] is True
    assert {k: v for k, v in again.items() if k != "cached"} == {k: v for k, v in rec.items() if k != "cached"}


def test_eval_default_output_is_a_folder_per_checkpoint(trained: tuple[Path, Path, np.ndarray], tmp_path: Path) -> None:
    ckpt, bin_path, _ = trained
    copy = tmp_path / "ckpt" / "last.pt"
    copy.parent.mkdir()
    shutil.copyfile(ckpt, copy)
    state = load_checkpoint(copy)
    assert main(["eval", str(copy), "--bin", str(bin_path)]) == 0
    (first,) = (copy.parent / "eval" / f"step_{state['step']:07d}").glob("pairs-*")  # one folder per sets
    assert (first / "results.json").is_file() and (first / "roc.png").is_file()
    earlier = copy.parent / "step_0000001.pt"  # another checkpoint of the run keeps its own report
    save_checkpoint(earlier, {**state, "step": 1})
    assert main(["eval", str(earlier), "--bin", str(bin_path)]) == 0
    (second,) = (copy.parent / "eval" / "step_0000001").glob("pairs-*")
    assert (second / "results.json").is_file() and (first / "results.json").is_file()


def test_eval_errors_are_one_line(trained: tuple[Path, Path, np.ndarray], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, _, _ = trained
    images, issame = synthetic_pairs(8, num_identities=10, image_size=24, split="test")
    write_bin(tmp_path / "small.bin", images, issame)
    assert main(["eval", str(ckpt), "--bin", str(tmp_path / "small.bin"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "small.bin: images are 24x24 but the model takes 32x32" in err
    assert main(["eval", str(ckpt), "--pairs", "-5"]) == 2
    assert "--pairs -5: expected an int >= 0" in capsys.readouterr().err


def test_compare_puts_every_checkpoint_and_set_in_one_table(
    trained: tuple[Path, Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, bin_path, _ = trained
    other = tmp_path / "other.pt"
    shutil.copyfile(ckpt, other)
    images, issame = synthetic_pairs(16, num_identities=100, image_size=32, split="test", seed=3)
    write_bin(tmp_path / "second.bin", images, issame)
    out = tmp_path / "cmp"
    capsys.readouterr()
    assert main(["eval", "--compare", str(ckpt), str(other), "--bin", str(bin_path),
                 "--bin", str(tmp_path / "second.bin"), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    table = (out / "results.md").read_text()
    for row in ("last.pt on pairs", "last.pt on second", "other.pt on pairs", "other.pt on second"):
        assert re.search(rf"^\| {re.escape(row)} +\| \d+\.\d\d ±", table, re.M), row
        assert row in text
    records = json.loads((out / "results.json").read_text())["results"]
    assert len(records) == 4
    # the same weights give the same numbers
    by = {(r["checkpoint"], r["set"]): r for r in records}
    assert by[("last.pt", "pairs")]["accuracy"] == by[("other.pt", "pairs")]["accuracy"]
    assert (out / "roc.png").is_file()
    assert len(list(out.glob("hist_*.png"))) == 4 and len(list(out.glob("emb_*.npy"))) == 2  # same content hash: one cache per set


# ----------------------------------------------------------------------------------------------------
# IJB, identification with distractors, retrieval, learned threshold: untrained tiny checkpoints
# (tests/_eval_data.py) on tiny generated data; every number recomputed here from the cached features.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_sets")
    return {
        "ckpt": E.tiny_checkpoint(root / "a" / "last.pt"),
        "other": E.tiny_checkpoint(root / "b" / "last.pt", seed=1, threshold=0.25),
        "ijb": E.mini_ijb(root),
        "people": E.identity_folder(root / "people", identities=5, per_identity=3),
        "distractors": root / "distractors",
    }


def _record(out: Path, kind: str) -> dict:
    (rec,) = [r for r in json.loads((out / "results.json").read_text())["results"] if r["kind"] == kind]
    return rec


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_eval_ijb_1to1_and_1toN_match_plain_loops(tiny: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ijb"
    assert main(["eval", str(tiny["ckpt"]), "--ijb", str(tiny["ijb"]), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "## IJB 1:1 verification (TAR@FAR)" in text and "## IJB 1:N identification (mixed probes)" in text
    for name in ("results.md", "results.json", "roc.png", "hist_IJBC.png"):
        assert (out / name).stat().st_size > 0, name
    rec = _record(out, "ijb")
    feats = np.load(rec["embeddings"]).astype(np.float64)
    assert feats.shape == (4 * E.SUBJECTS, 16)

    # templates by hand: images averaged per media, medias summed, normalised
    lines = [ln.split() for ln in (tiny["ijb"] / "meta" / "ijbc_face_tid_mid.txt").read_text().splitlines()]
    media_feats: dict[tuple[int, int], list[np.ndarray]] = {}
    for (name, t, m), f in zip(lines, feats):
        media_feats.setdefault((int(t), int(m)), []).append(f)
    templates: dict[int, np.ndarray] = {}
    for (t, _), fs in media_feats.items():
        templates[t] = templates.get(t, 0) + np.mean(fs, axis=0)
    templates = {t: f / np.linalg.norm(f) for t, f in templates.items()}
    pairs = [ln.split() for ln in (tiny["ijb"] / "meta" / "ijbc_template_pair_label.txt").read_text().splitlines()]
    scores = [float(templates[int(a)] @ templates[int(b)]) for a, b, _ in pairs]
    labels = [int(y) for _, _, y in pairs]
    assert rec["template_pairs"] == len(pairs) == 28
    for far, tar in rec["verification"]["tar_at_far"].items():
        assert tar == pytest.approx(E.loop_tar_at_far(scores, labels, float(far)), abs=1e-12), far
    assert rec["verification"]["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)

    # 1:N: probes (second templates) against each gallery (first templates)
    probes = {10 * s + 2: s for s in range(E.SUBJECTS)}
    for gallery, subjects in (("G1", (0, 1)), ("G2", (2, 3))):
        g = {10 * s + 1: s for s in subjects}
        got = rec["identification"][gallery]
        mated = [p for p, s in probes.items() if s in subjects]
        ranks = [E.loop_rank([templates[p] @ templates[t] for t, s in g.items() if s == probes[p]],
                             [templates[p] @ templates[t] for t, s in g.items() if s != probes[p]]) for p in mated]
        assert got["rank"]["1"] == pytest.approx(np.mean([r <= 1 for r in ranks]))
        assert got["rank"]["10"] == 1.0  # the gallery has 2 templates: every mate is within rank 2
        # FPIR 1e-2 with 2 non-mated probes admits no false alarm: mates must beat every non-mated top score
        bar = max(max(templates[p] @ templates[t] for t in g) for p, s in probes.items() if s not in subjects)
        hits = [r == 1 and max(templates[p] @ templates[t] for t, s in g.items() if s == probes[p]) > bar
                for p, r in zip(mated, ranks)]
        assert got["tpir_at_fpir"]["1e-02"] == pytest.approx(np.mean(hits)), gallery
        assert got["mated_probes"] == 2 and got["non_mated_probes"] == 2


def test_faceness_weighting_reuses_the_cached_ijb_features(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ijb_faceness"
    assert main(["eval", str(tiny["ckpt"]), "--ijb", str(tiny["ijb"]), "--output", str(out)]) == 0
    plain = _record(out, "ijb")
    assert main(["eval", str(tiny["ckpt"]), "--ijb", str(tiny["ijb"]), "--ijb-faceness", "--output", str(out)]) == 0
    weighted = _record(out, "ijb")
    # the faceness weighting applies to templates: the same image features, read back, not embedded again
    assert weighted["cached"] is True and weighted["embeddings"] == plain["embeddings"]
    assert weighted["set"] != plain["set"] and weighted["faceness_weight"] is True


def test_ijb_insightface_protocol_reproduces_its_conventions(tiny: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from sklearn.metrics import roc_curve

    from faceforge.eval.ijb import ijb_templates
    from faceforge.eval.metrics import tpir_at_fpir
    from faceforge.data.ijb import IJBMeta

    out = tmp_path / "ijb_insightface"
    assert main(["eval", str(tiny["ckpt"]), "--ijb", str(tiny["ijb"]), "--protocol", "insightface",
                 "--output", str(out)]) == 0
    table = capsys.readouterr().out
    rec = _record(out, "ijb")
    assert rec["protocol"] == "insightface" and rec["faceness_weight"] is True  # insightface's default: D1
    # every number's row names the protocol
    rows = [line for line in table.splitlines() if line.startswith("| last.pt")]
    assert rows and all("insightface" in line for line in rows)
    # 1:1: the ROC point (sklearn's roc_curve, as insightface calls it) whose FPR is nearest the FAR
    meta = IJBMeta.load(tiny["ijb"], "IJBC")
    ids, feats = ijb_templates(np.load(rec["embeddings"]), meta, faceness_weight=True)
    pos = {t: i for i, t in enumerate(ids.tolist())}
    scores = np.array([feats[pos[a]] @ feats[pos[b]] for a, b in zip(meta.p1.tolist(), meta.p2.tolist())])
    fpr, tpr, _ = roc_curve(meta.labels, scores)
    for far, tar in rec["verification"]["tar_at_far"].items():
        assert tar == pytest.approx(tpr[np.argmin(np.abs(fpr - float(far)))], abs=1e-12), far
    # 1:N: one false alarm fewer than the faceforge protocol: k = ceil(FPIR N) non-mated scores at or above the bar
    sim = np.array([[1.0, 0.2], [0.1, 0.9], [0.8, 0.3], [0.5, 0.95]])  # probes 0, 1 mated; 2, 3 non-mated
    probe_labels, gallery_labels = np.array([0, 1, 7, 8]), np.array([0, 1])
    # FPIR 0.5 of 2 non-mated probes: faceforge allows 1 false alarm (bar = 0.8), insightface none (bar = 0.95)
    assert tpir_at_fpir(sim, probe_labels, gallery_labels, 0.5) == 1.0  # mates 1.0 and 0.9 both beat 0.8
    assert tpir_at_fpir(sim, probe_labels, gallery_labels, 0.5, protocol="insightface") == 0.5  # 0.9 < 0.95


def test_ijb_gallery_naming_missing_templates_keeps_the_1to1_results(tiny: dict[str, Path], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    release = tmp_path / "IJBC"
    shutil.copytree(tiny["ijb"], release)
    gallery = release / "meta" / "ijbc_1N_gallery_G2.csv"
    gallery.write_text(gallery.read_text() + "999,9,z.png\n998,9,z.png\n")  # two templates the meta file lacks
    out = tmp_path / "out"
    assert main(["eval", str(tiny["ckpt"]), "--ijb", str(release), "--output", str(out)]) == 0
    captured = capsys.readouterr()
    rec = _record(out, "ijb")
    assert rec["verification"]["tar_at_far"] and "tpir_at_fpir" in rec["identification"]["G1"]
    error = rec["identification"]["G2"]["error"]
    assert "ijbc_1N_gallery_G2.csv: 2 of its 4 templates have no images" in error
    assert "ijbc_1N_gallery_G2.csv: 2 of its 4 templates" in captured.err
    assert "2 of its 4 templates" in (out / "results.md").read_text()


def test_eval_identification_with_distractors_matches_plain_loops(tiny: dict[str, Path], tmp_path: Path) -> None:
    distractor_paths = E.flat_folder(tiny["distractors"], 30)
    out = tmp_path / "ident"
    assert main(["eval", str(tiny["ckpt"]), "--probes", str(tiny["people"]), "--distractors",
                 str(tiny["distractors"]), "--distractor-counts", "10", "20", "--output", str(out)]) == 0
    rec = _record(out, "identification")
    probes = _unit(np.load(rec["embeddings"]["probes"]).astype(np.float64))
    distractors = _unit(np.load(rec["embeddings"]["distractors"]).astype(np.float64))
    assert len(distractors) == len(distractor_paths) == 30 and len(probes) == 15
    labels = np.repeat(np.arange(5), 3)  # id_00..id_04, sorted; the first image of each is enrolled
    gallery = [3 * i for i in range(5)]
    probe_idx = [k for k in range(15) if k % 3]
    assert rec["probes"] == 10 and rec["gallery"] == 5 and set(rec["by_distractors"]) == {"10", "20", "30"}
    for n in (10, 20, 30):
        ranks, pos, neg = [], [], []
        for p in probe_idx:
            mate = [probes[p] @ probes[g] for g in gallery if labels[g] == labels[p]]
            others = [probes[p] @ probes[g] for g in gallery if labels[g] != labels[p]]
            others += [probes[p] @ d for d in distractors[:n]]
            ranks.append(E.loop_rank(mate, others))
            pos += mate
            neg += others
        got = rec["by_distractors"][str(n)]
        for k in (1, 5, 10):
            assert got["rank"][str(k)] == pytest.approx(np.mean([r <= k for r in ranks])), (n, k)
        assert got["negative_pairs"] == len(neg)
        assert got["tar_at_far"]["1e-06"] == pytest.approx(
            E.loop_tar_at_far(pos + neg, [1] * len(pos) + [0] * len(neg), 1e-6), abs=1e-6)
    table = (out / "results.md").read_text()
    assert "rank-1 @10" in table and "rank-1 @30" in table and (out / "hist_people_distractors.png").is_file()


def loop_recall_and_map(x: np.ndarray, y: np.ndarray, ks: list[int]) -> tuple[dict[int, float], float]:
    """Every item queries all others: recall@k (a same-label item among the k nearest) and mAP."""
    x = _unit(x)
    hits = {k: 0 for k in ks}
    aps = []
    for i in range(len(x)):
        others = sorted((j for j in range(len(x)) if j != i), key=lambda j: -(x[i] @ x[j]))
        rel = [y[j] == y[i] for j in others]
        for k in ks:
            hits[k] += any(rel[: min(k, len(others))])
        if any(rel):
            aps.append(np.mean([sum(rel[: r + 1]) / (r + 1) for r in range(len(rel)) if rel[r]]))
    return {k: h / len(x) for k, h in hits.items()}, float(np.mean(aps))


def test_eval_retrieval_on_a_class_disjoint_split_matches_plain_loops(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "retr"
    assert main(["eval", str(tiny["ckpt"]), "--retrieval", str(tiny["people"]), "--retrieval-test-fraction", "0.6",
                 "--output", str(out)]) == 0
    rec = _record(out, "retrieval")
    x = np.load(rec["embeddings"]).astype(np.float64)
    assert rec["classes"] == 3 and rec["items"] == len(x) == 9  # round(0.6 * 5) of the 5 identities
    from faceforge.eval.retrieval import class_disjoint_split

    test = class_disjoint_split(np.repeat(np.arange(5), 3), 0.6, seed=0)[1]
    recall, mean_ap = loop_recall_and_map(x, np.repeat(np.arange(5), 3)[test], [1, 10, 20, 30, 100, 1000])
    for k, r in rec["recall"].items():
        assert r == pytest.approx(recall[int(k)]), k
    assert rec["map"] == pytest.approx(mean_ap)
    assert "R@1000" in (out / "results.md").read_text() and (out / "roc.png").is_file()


def test_eval_combines_sets_compares_and_reports_the_learned_threshold(tiny: dict[str, Path], tmp_path: Path) -> None:
    images, issame = synthetic_pairs(16, num_identities=40, image_size=E.SIZE, split="test", seed=4)
    write_bin(tmp_path / "pairs32.bin", images, issame)
    out = tmp_path / "both"
    assert main(["eval", "--compare", str(tiny["ckpt"]), str(tiny["other"]), "--bin", str(tmp_path / "pairs32.bin"),
                 "--retrieval", str(tiny["people"]), "--output", str(out)]) == 0
    records = json.loads((out / "results.json").read_text())["results"]
    assert sorted((r["checkpoint"], r["kind"]) for r in records) == [
        ("a/last.pt", "retrieval"), ("a/last.pt", "verification"),
        ("b/last.pt", "retrieval"), ("b/last.pt", "verification"),
    ]
    verification = {r["checkpoint"]: r for r in records if r["kind"] == "verification"}
    assert "accuracy_at_model_threshold" not in verification["a/last.pt"]  # no learned one, no run metrics
    learned = verification["b/last.pt"]
    scores = pair_scores(np.load(learned["embeddings"]))
    assert learned["model_threshold"] == 0.25
    assert learned["model_threshold_source"] == "learned by the head (SphereFace2)"
    assert learned["accuracy_at_model_threshold"] == pytest.approx(np.mean((scores >= 0.25) == issame))
    table = (out / "results.md").read_text()
    assert "accuracy@model threshold" in table and "## Retrieval (class-disjoint)" in table
    assert len(list(out.glob("hist_*.png"))) == 4


def test_eval_bad_requests_are_clear_errors(tiny: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tiny["ckpt"]), "--probes", str(tiny["people"]), "--output", str(tmp_path)]) == 2
    assert "needs both --probes" in capsys.readouterr().err
    big = E.identity_folder(tmp_path / "big", identities=2, per_identity=2, size=40)
    assert main(["eval", str(tiny["ckpt"]), "--retrieval", str(big), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "img_00.png: image is 40x40 but the model takes 32x32" in err


def test_eval_masked_scores_each_pair_set_masked_and_unmasked_side_by_side(
    trained: tuple[Path, Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from faceforge.data.masks import mask_images_uint8, upper_face_rows
    from faceforge.data.pairs import load_bin

    ckpt, bin_path, issame = trained
    out = tmp_path / "masked"
    assert main(["eval", str(ckpt), "--bin", str(bin_path), "--masked", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Masked verification" in text and "10-fold accuracy, masked" in text
    records = {r["set"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert set(records) == {"pairs", "pairs (masked)"}
    plain, masked = np.load(records["pairs"]["embeddings"]), np.load(records["pairs (masked)"]["embeddings"])
    assert np.array_equal(plain[0::2], masked[0::2])  # the first image of every pair is untouched
    assert not np.allclose(plain[1::2], masked[1::2])  # the second wears a mask
    expect = evaluate_scores(pair_scores(masked), issame, fars=EVAL_FARS)
    assert records["pairs (masked)"]["accuracy"] == pytest.approx(expect.accuracy, abs=1e-12)
    # the masked images are the masks of (seed 0, pair k) on the second images, the upper face unchanged
    images, _ = load_bin(bin_path)
    built = evaluate.masked_pair_set(evaluate.PairSet("pairs", images, issame)).images
    assert np.array_equal(built[1::2], mask_images_uint8(np.asarray(images)[1::2], 0, np.arange(len(issame))))
    top = upper_face_rows(built.shape[1])
    assert np.array_equal(built[:, :top], np.asarray(images)[:, :top])
    with pytest.raises(ValueError, match="--masked"):
        evaluate._with_twins([], evaluate.EvalRequest(masked=True))
