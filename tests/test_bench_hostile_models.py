"""Smoke test of benchmarks/bench_hostile_models.py against this tree: two of its crafted inputs (a model.json
naming ``torch.hub:load``, a gallery.json that is a list) are one line, exit 2, and the planted code never ran."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_hostile_models as B  # noqa: E402


def test_two_hostile_model_inputs_are_one_line_exit_2_and_run_nothing(tmp_path: Path) -> None:
    cases = {c.what: c for c in B.make_cases(tmp_path / "after", str(ROOT))}
    hub = cases["`verify` of a model.json naming `torch.hub:load` (a local hubconf.py)"]
    listed = cases["`search` with a gallery.json that is a top-level list"]
    for case, words in ((hub, "names code to import"), (listed, "expected a JSON object")):
        code, seconds, mb, last = B.run(B._faceforge(str(ROOT), case.argv), 4 * 2**20, 300)
        assert code == 2 and last.startswith(f"faceforge {case.argv[0]}: ") and words in last, (code, last)
    assert hub.check() == "marker: none" and not (tmp_path / "after" / "HUB_RAN").exists()
