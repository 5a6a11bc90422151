import pytest

from tests.multihost.procs import Group


@pytest.fixture
def group(tmp_path):
    g = Group(tmp_path / "logs")
    yield g
    g.kill_all()
