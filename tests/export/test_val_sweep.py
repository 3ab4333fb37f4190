"""export/val_sweep.py: val BLEU of an entry over a grid of decoding settings, best first."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.val_sweep import main, sweep


def test_sweep_scores_every_setting_on_val_best_first(tiny_repository_entry: Path, data_dir: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = sweep([tiny_repository_entry], [1, 2], [0.6, 1.0], data_dir)
    assert {(r["beam"], r["length_penalty"]) for r in rows} == {(1, 0.6), (1, 1.0), (2, 0.6), (2, 1.0)}
    assert [r["bleu"] for r in rows] == sorted((r["bleu"] for r in rows), reverse=True)
    assert all("tok:13a" in str(r["signature"]) and 0 <= float(str(r["chrf"])) <= 100 for r in rows)
    greedy = {r["length_penalty"]: r["bleu"] for r in rows if r["beam"] == 1}
    assert greedy[0.6] == greedy[1.0]  # a length penalty ranks beams: greedy decoding ignores it
    out = tmp_path / "sweep.json"
    assert main([str(tiny_repository_entry), "--beams", "1", "--data-dir", str(data_dir), "--out", str(out)]) == 0
    assert out.exists() and "| 1 | 1.0 |" in capsys.readouterr().out
