"""Every Python block of the README runs as written, in a fresh namespace and folder."""

import os
import re

import jax
import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def _blocks():
    text = open(README).read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


BLOCKS = _blocks()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    block = BLOCKS[index]
    monkeypatch.chdir(tmp_path)
    ns = {}
    # README code is user code: JAX's default promotion rules, not the suite's strict ones
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        exec(compile(block, f"README.md block {index}", "exec"), ns)  # noqa: S102
    if "qparams" in ns:  # the whole-model block: smaller, and the model still runs
        import distq

        assert distq.tree_nbytes(ns["qparams"]) < distq.tree_nbytes(ns["params"]) / 3
        assert ns["y"].shape == (32, 10)
