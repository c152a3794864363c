"""The README's self-contained examples run (the tour's first block and the whole-model block)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def _blocks():
    text = open(README).read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("marker", ["q = distq.quantize(x, distq.Scalar(bits=4, objective",
                                    "qparams, report = distq.quantize_tree(params, rules)"])
def test_readme_block_runs(marker, tmp_path, monkeypatch):
    (block,) = [b for b in _blocks() if marker in b]
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(block, "README.md", "exec"), ns)  # noqa: S102
    if "qparams" in ns:
        import distq

        assert distq.tree_nbytes(ns["qparams"]) < distq.tree_nbytes(ns["params"]) / 3
        assert ns["y"].shape == (32, 10)
