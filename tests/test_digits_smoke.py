"""Smoke test of experiments/digits_qat.py in its --quick mode (about two minutes: slow)."""

import pytest

import _experiments

pytest.importorskip("sklearn")


def _load():
    return _experiments.load("digits_qat")


@pytest.mark.slow
def test_quick_run_writes_the_table_and_qat_matches_the_quantised_model(tmp_path):
    mod = _load()
    out = tmp_path / "digits_qat.md"
    # exit code 0: every QAT row's quantised predictions equal the QAT forward pass
    assert mod.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| float |" in text and "| QAT |" in text and "prune 90 %" in text
    rows = {line.split("|")[2].strip(): line.split("|") for line in text.splitlines()
            if line.startswith("| ")}
    float_acc = float(rows[next(k for k in rows if k.startswith("float32"))][6])
    qat2 = rows[next(k for k in rows if k.startswith("QAT Scalar(bits=2, axis=-1)"))]
    assert float_acc > 95.0
    assert float(qat2[7]) > -1.0, "2-bit QAT is more than one point below float"
