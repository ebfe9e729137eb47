"""OpenFL 1.9's compression vectors made afresh by OpenFL, so the committed ones cannot drift from it.

`openfl_side/make_openfl_vectors.py` runs in OpenFL's virtualenv and encodes the same arrays with
every shipped pipeline again; each new vector must decode with ours as the committed file's do
(bit for bit as the sender meant it, and as OpenFL decodes it but where OpenFL garbles it), and
its format (tags, metadata layout, shape) must be the committed one's. Its bytes may differ
(gzip's timestamp, scikit-learn's threads), so they are not compared.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from openfl_vectors import check_vector, load_vectors
from openfl_workspace import OPENFL_SIDE, openfl_venv


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vector file written just now by OpenFL itself."""
    out = tmp_path_factory.mktemp("openfl-vectors") / "openfl_pipelines.json"
    python = openfl_venv() / "bin" / "python"
    subprocess.run(
        [str(python), str(OPENFL_SIDE / "make_openfl_vectors.py"), str(out)],
        check=True,
        timeout=120,
        capture_output=True,
    )
    return out


def test_fresh_vectors_decode_as_openfl_meant_them(fresh: Path) -> None:
    """Every vector OpenFL makes now decodes with ours to what its pipeline sent."""
    vectors = load_vectors(fresh)
    assert vectors
    for vector in vectors:
        check_vector(vector)


def test_fresh_vectors_have_the_committed_format(fresh: Path) -> None:
    """The same vectors, each with the committed one's tags, metadata layout and shape."""
    committed = {vector.name: vector for vector in load_vectors()}
    made = {vector.name: vector for vector in load_vectors(fresh)}
    assert made.keys() == committed.keys()
    for name, vector in made.items():
        before = committed[name]
        assert (vector.tags, vector.layout(), vector.shape) == (
            before.tags,
            before.layout(),
            before.shape,
        ), name
