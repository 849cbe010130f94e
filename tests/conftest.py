import os

import pytest

# an accidental download must fail fast, never hang a test
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def unwritable_dir(tmp_path_factory) -> str:
    """A folder nothing can be written into. Tests run as root in CI, where permission bits stop nothing: there a
    path under /sys (sysfs refuses new entries even to root), elsewhere a folder made read-only."""
    if os.geteuid() == 0:
        return "/sys/clipfromscratch-test"
    folder = tmp_path_factory.mktemp("read-only")
    folder.chmod(0o555)
    return str(folder)
